"""Which layers of a model are compressible, and how their weights map to rows x cols per group.

The solvers see one weight matrix W (rows x cols) and its Hessian. Here a layer's weight becomes
``(groups, rows, cols)``: a linear layer is one group of ``out_features x in_features``; a conv
layer is one group per conv group, each ``out_channels/groups x (in_channels/groups * taps)`` in
the order of ``weight.flatten(1)``, which is the column order of
``obcompress.solvers.hessian.unfold_conv_input``. transformers' ``Conv1D`` (GPT-2 style) is a
linear layer that stores its weight transposed, ``(in, out)``.
"""

from __future__ import annotations

import importlib.util
import sys
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Union

import torch
import torch.nn as nn

from ..checks import check_selector, selector_matches

__all__ = ["COMPRESSIBLE", "LayerInfo", "find_layers", "is_compressible", "set_weight_groups", "weight_groups"]


def _transformers_conv1d() -> Optional[type]:
    """transformers' Conv1D class when transformers is importable, else None (never required)."""
    module = sys.modules.get("transformers.pytorch_utils")
    if module is None:
        try:
            if importlib.util.find_spec("transformers") is None:
                return None
            import transformers.pytorch_utils as module  # noqa: F811
        except Exception:  # a broken transformers install must not break obcompress
            return None
    return getattr(module, "Conv1D", None)


_HF_CONV1D = _transformers_conv1d()
COMPRESSIBLE = (nn.Linear, nn.Conv1d, nn.Conv2d) + ((_HF_CONV1D,) if _HF_CONV1D is not None else ())


def _is_hf_conv1d(module: nn.Module) -> bool:
    # Detected by duck type, not isinstance: the model may come from a transformers version (or a
    # vendored copy) other than the one importable here.
    w = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and hasattr(module, "nf")
        and isinstance(w, torch.Tensor)
        and w.dim() == 2
        and w.shape[1] == module.nf
    )


def is_compressible(module: nn.Module) -> bool:
    """True for nn.Linear, nn.Conv1d, nn.Conv2d (any groups) and transformers' Conv1D."""
    return isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)) or _is_hf_conv1d(module)


@dataclass
class LayerInfo:
    """A compressible layer and the shape of its weight as solver problems.

    ``weight_groups(info)`` is ``(groups, rows, cols)``; ``taps`` kernel positions make up the
    columns (``cols = in_channels/groups * taps``), which is the ``columns_last`` argument of the
    solvers' N:M structures.
    """

    name: str
    module: nn.Module
    kind: str  # "linear" | "conv1d" | "conv2d" | "conv1d_hf" (transformers Conv1D)
    groups: int  # conv groups (1 for linear); depthwise = groups == in_channels
    taps: int  # kernel positions (kh*kw, or k for conv1d; 1 for linear) = columns_last
    rows: int  # output channels per group
    cols: int  # inputs per group (C/groups * taps, or in_features)

    @property
    def depthwise(self) -> bool:
        return self.kind in ("conv1d", "conv2d") and self.groups > 1 and self.cols == self.taps


def _layer_info(name: str, module: nn.Module) -> LayerInfo:
    w = getattr(module, "weight", None)
    if isinstance(w, nn.parameter.UninitializedParameter):
        raise ValueError(f"layer {name!r}: its weight is not initialised yet (lazy module); run one forward pass first")
    if _is_hf_conv1d(module):
        return LayerInfo(name, module, "conv1d_hf", 1, 1, int(w.shape[1]), int(w.shape[0]))
    if isinstance(module, nn.Linear):
        return LayerInfo(name, module, "linear", 1, 1, int(w.shape[0]), int(w.shape[1]))
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        kind = "conv1d" if isinstance(module, nn.Conv1d) else "conv2d"
        groups = int(module.groups)
        taps = 1
        for k in w.shape[2:]:
            taps *= int(k)
        return LayerInfo(name, module, kind, groups, taps, int(w.shape[0]) // groups, int(w.shape[1]) * taps)
    raise ValueError(f"layer {name!r} ({type(module).__name__}) is not compressible")


def _never_called_names(model: nn.Module) -> set:
    # nn.MultiheadAttention uses out_proj.weight inside F.multi_head_attention_forward without ever
    # calling out_proj, so no forward hook on it would fire and it would get no Hessian.
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            names.add(f"{name}.out_proj" if name else "out_proj")
    return names


def _as_patterns(value, what: str) -> List[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    try:
        entries = list(value)
    except TypeError:
        raise ValueError(f"{what} must be a list of module names, class names or 're:' patterns, got {value!r}") from None
    return [check_selector(entry, f"{what}[{i}]") for i, entry in enumerate(entries)]


def _matches(entry: str, name: str, module: nn.Module) -> bool:
    return selector_matches(entry, name, type(module).__name__)


def find_layers(
    model: nn.Module,
    targets: Union[None, str, Sequence[str]] = None,
    ignore: Union[str, Iterable[str]] = (),
) -> "OrderedDict[str, LayerInfo]":
    """The compressible layers of ``model`` to compress, in ``model.named_modules()`` order.

    ``targets=None`` takes every compressible layer. Each entry of ``targets`` / ``ignore`` is a
    module class name (``"Linear"``, ``"Conv2d"``), an exact module name (``"features.3.conv"``) or
    ``"re:<pattern>"`` matched with ``re.fullmatch`` against the module name. A pattern may also match
    non-compressible modules (containers, norms); those are skipped. Raises ValueError for a target
    that matches no compressible layer, an ignore entry that matches no module at all (a typo would
    silently compress the layer it meant to keep), a model without compressible layers, and a
    selection that ends up empty.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    target_entries = None if targets is None else _as_patterns(targets, "targets")
    ignore_entries = _as_patterns(ignore, "ignore")
    if target_entries is not None and not target_entries:
        raise ValueError("targets is empty: give None to select every compressible layer")

    modules = list(model.named_modules())
    if not any(is_compressible(m) for _, m in modules):
        raise ValueError(
            f"{type(model).__name__} has no compressible layer (nn.Linear, nn.Conv1d, nn.Conv2d or transformers Conv1D)"
        )
    never_called = _never_called_names(model)

    if target_entries is None:
        selected = [(n, m) for n, m in modules if is_compressible(m) and n not in never_called]
    else:
        chosen = set()
        for entry in target_entries:
            hits = [(n, m) for n, m in modules if _matches(entry, n, m)]
            if not hits:
                raise ValueError(f"target {entry!r} matches no module of {type(model).__name__}")
            good = [n for n, m in hits if is_compressible(m)]
            if not good:
                n, m = hits[0]
                raise ValueError(
                    f"target {entry!r} matches no compressible layer (it matches {n or '<root>'!r}, a {type(m).__name__}); "
                    "compressible layers are nn.Linear, nn.Conv1d, nn.Conv2d and transformers Conv1D"
                )
            callable_ = [n for n in good if n not in never_called]
            if not callable_:
                raise ValueError(
                    f"target {entry!r} selects only {good[0]!r}, which cannot be compressed: nn.MultiheadAttention "
                    "uses that weight directly and never calls the layer, so it sees no calibration inputs"
                )
            chosen.update(callable_)
        selected = [(n, m) for n, m in modules if n in chosen]

    for entry in ignore_entries:
        if not any(_matches(entry, n, m) for n, m in modules):
            raise ValueError(f"ignore entry {entry!r} matches no module of {type(model).__name__}")
    selected = [(n, m) for n, m in selected if not any(_matches(e, n, m) for e in ignore_entries)]
    if not selected:
        raise ValueError(f"no layer left to compress: targets={targets!r} with ignore={list(ignore_entries)!r} selects nothing")
    return OrderedDict((n, _layer_info(n, m)) for n, m in selected)


def weight_groups(info: LayerInfo, dtype: Optional[torch.dtype] = torch.float32) -> torch.Tensor:
    """A copy of the layer's weight of shape (groups, rows, cols), in ``dtype`` (None: its own)."""
    w = info.module.weight.detach()
    if info.kind == "conv1d_hf":
        w = w.t()
    # Conv group g owns output channels [g*rows, (g+1)*rows): contiguous blocks of the flattened weight.
    return w.reshape(info.groups, info.rows, info.cols).to(dtype or w.dtype, copy=True)


def set_weight_groups(info: LayerInfo, W: torch.Tensor) -> None:
    """Write W (groups, rows, cols) back into the layer in its own layout, dtype and device.

    A 2-D (rows, cols) W is accepted for single-group layers.
    """
    weight = info.module.weight
    expected = (info.groups, info.rows, info.cols)
    if not isinstance(W, torch.Tensor):
        raise ValueError(f"layer {info.name!r}: new weight must be a torch.Tensor, got {type(W).__name__}")
    if W.dim() == 2 and info.groups == 1:
        W = W.unsqueeze(0)
    if tuple(W.shape) != expected:
        raise ValueError(f"layer {info.name!r}: new weight has shape {tuple(W.shape)}, expected (groups, rows, cols) = {expected}")
    if not W.is_floating_point():
        raise ValueError(f"layer {info.name!r}: new weight must be floating point, got {W.dtype}")
    if not torch.isfinite(W).all():
        raise ValueError(f"layer {info.name!r}: new weight has non-finite values")
    W = W.detach().to(device=weight.device, dtype=weight.dtype)
    if info.kind == "conv1d_hf":
        W = W[0].t()
    with torch.no_grad():
        weight.copy_(W.reshape(weight.shape))
