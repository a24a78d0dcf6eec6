"""Applying a FIT configuration to a model.

- ``apply_path_rtn``: a FITCompress path (``plan_path``) as the reference applies it before its
  fine-tune: the end node's zeros as the mask, the masked weights rounded on one symmetric grid per
  tensor (the paper's (a), without fine-tuning).
- ``apply_rtn_fit``: a configuration of per-layer (sparsity, bits), the telescoping planner's:
  FIT-importance masks ranked on the dense weights, per-channel round to nearest.
- ``finetune``: the short fine-tune after either, masks frozen, straight-through quantization on
  the fixed grids.
- ``fit_recipe``: the configuration as a recipe for ``obcompress.api.compress``: the exact OBC
  solvers at the found per-layer bits and sparsity (our (b)).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from ..model.calibration import count_samples
from ..model.layers import find_layers
from ..solvers import QuantGrid
from ..solvers.grid import check_grid
from .fisher import Fisher, ModelState, check_fisher, check_loss, split_batch
from .fit_path import FitPath, check_int
from .fit_score import as_unstructured, fit_masks, layer_weights
from .space import LayerGeometry, Variant, configuration_recipe

__all__ = ["apply_path_rtn", "apply_rtn_fit", "finetune", "fit_recipe"]


def fit_recipe(choice: Mapping[str, Union[Variant, str]], activation_bits: Optional[int] = None, *,
               damp: Any = "auto") -> Dict[str, Any]:
    """The recipe ``compress`` applies to give each layer its variant with the OBC solvers (solver
    exact; dense layers left out of the targets), as ``Database.recipe`` writes it."""
    return configuration_recipe(choice, activation_bits=activation_bits, damp=damp)


def _layer_geoms(model: nn.Module, names: Iterable[str]) -> Dict[str, Any]:
    infos = find_layers(model)
    out = {}
    for nm in names:
        if nm not in infos:
            raise ValueError(f"layer {nm!r} is not a compressible layer of the model")
        li = infos[nm]
        out[nm] = (li, LayerGeometry(name=nm, kind=li.kind, groups=li.groups, rows=li.rows, cols=li.cols, taps=li.taps))
    return out


def apply_path_rtn(model: nn.Module, path: FitPath) -> Tuple[Dict[str, torch.Tensor], Dict[str, Optional[QuantGrid]]]:
    """Compress ``model`` in place with a FITCompress path's configuration as the reference applies
    it before fine-tuning: each layer's mask is the end node's zeros (the pruned count its
    configuration was costed with), and the masked dense weights are rounded on the reference's
    grid, one symmetric step ``max|w| / (2^(b-1) - 1)`` per tensor (``fake_quantize``). Returns
    (masks, grids) per layer: True = kept, in the weight's shape; grids on (groups x rows, cols);
    what ``finetune`` takes."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(path, FitPath) or path.weights is None:
        raise ValueError("path must be a FitPath of the FITCompress planner (plan_path), which carries its end "
                         "node's weights; apply a telescoping path with apply_rtn_fit(model, path.choice, fisher)")
    found = _layer_geoms(model, path.weights)
    masks: Dict[str, torch.Tensor] = {}
    grids: Dict[str, Optional[QuantGrid]] = {}
    for nm, end in path.weights.items():
        li, geom = found[nm]
        w = li.module.weight
        if tuple(end.shape) != tuple(w.shape):
            raise ValueError(f"layer {nm!r}: the path's weights have shape {tuple(end.shape)}, the model's "
                             f"{tuple(w.shape)}")
        keep = end != 0
        bits = path.choice[nm].bits
        rows = geom.as_rows(w.detach().to(torch.float32).cpu() * keep)
        top = float(rows.abs().max())
        half = 2 ** (bits - 1) - 1
        # The reference's grid as a per-tensor QuantGrid: codes round(w / step) + 2^(b-1); weights
        # within +-max use only the symmetric 2^b - 1 of its levels.
        step = top / half if top > 0 else 1.0
        grid = QuantGrid(bits, torch.tensor([[step]]), torch.tensor([[float(2 ** (bits - 1))]]), symmetric=True,
                         strategy="tensor")
        with torch.no_grad():
            w.copy_(geom.from_rows(grid.quantize(rows) * geom.as_rows(keep), w.shape).to(w.dtype))
        masks[nm], grids[nm] = keep, grid
    return masks, grids


def apply_rtn_fit(
    model: nn.Module,
    choice: Mapping[str, Union[Variant, str]],
    fisher: Fisher,
) -> Tuple[Dict[str, torch.Tensor], Dict[str, Optional[QuantGrid]]]:
    """Compress ``model`` in place with a configuration of per-layer (sparsity, bits), the telescoping
    planner's: each layer's FIT-importance mask at its sparsity ranked on the dense weights (as
    ``fit_noise`` ranks it), then round to nearest on the per-channel symmetric min-max grid of its
    dense weights (the grid the telescoping planner's noise is measured on). Returns (masks, grids)
    per compressed layer: True = kept, in the weight's shape; grids on (groups x rows, cols), None
    for float layers; what ``finetune`` takes."""
    fisher = check_fisher(fisher)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(choice, Mapping) or not choice:
        raise ValueError("choice must be a non-empty {layer: Variant} mapping")
    variants = {nm: as_unstructured(nm, v) for nm, v in choice.items()}
    variants = {nm: v for nm, v in variants.items() if v != Variant()}
    found = _layer_geoms(model, variants)
    W = layer_weights(fisher, model, list(variants))
    masks = fit_masks(fisher, W, {nm: v.sparsity for nm, v in variants.items()})
    grids: Dict[str, Optional[QuantGrid]] = {}
    for nm, v in variants.items():
        li, geom = found[nm]
        w = li.module.weight
        rows = geom.as_rows(W[nm]).to(torch.float32)
        keep = geom.as_rows(masks[nm])
        grid = None if v.bits is None else QuantGrid.fit(rows, v.bits, symmetric=True, strategy="channel")
        new = (grid.quantize(rows) if grid is not None else rows) * keep
        with torch.no_grad():
            w.copy_(geom.from_rows(new, w.shape).to(w.dtype))
        grids[nm] = grid
    return masks, grids


def finetune(
    model: nn.Module,
    data: Iterable,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    grids: Mapping[str, Optional[QuantGrid]],
    epochs: int = 1,
    lr: float = 1e-4,
) -> List[float]:
    """A short fine-tune of every trainable parameter with the masks frozen and straight-through
    quantization on the fixed ``grids`` (both from ``apply_rtn_fit``); returns each epoch's mean
    loss. The model runs in eval mode (dropout off, normalisation statistics frozen: a few epochs
    on calibration data should move weights, not statistics); its flags and ``.grad`` are restored,
    and the compressed layers end on their grids under their masks."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if loss_fn is None or not callable(loss_fn):
        raise ValueError("fine-tuning needs a loss: loss_fn(output, targets) -> the batch's mean loss")
    epochs = check_int("epochs", epochs, 0)
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not (0 < lr < math.inf):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if not isinstance(masks, Mapping) or not isinstance(grids, Mapping):
        raise ValueError("masks and grids must be {layer: ...} mappings (see apply_rtn_fit)")
    names = list(dict.fromkeys(list(masks) + list(grids)))
    found = _layer_geoms(model, names)
    param_name = {id(p): n for n, p in model.named_parameters()}
    layers = []
    for nm in names:
        li, geom = found[nm]
        w = li.module.weight
        keep = masks.get(nm)
        if keep is None:
            keep = torch.ones(w.shape, dtype=torch.bool)
        if not isinstance(keep, torch.Tensor) or keep.shape != w.shape:
            raise ValueError(f"layer {nm!r}: its mask must be a bool tensor of shape {tuple(w.shape)}")
        grid = grids.get(nm)
        if grid is not None:
            if not isinstance(grid, QuantGrid):
                raise ValueError(f"layer {nm!r}: grid must be a QuantGrid or None, got {type(grid).__name__}")
            try:
                check_grid(grid, geom.as_rows(w.detach()))
            except ValueError as e:
                raise ValueError(f"layer {nm!r}: {e}") from None
        layers.append((param_name[id(w)], w, geom, geom.as_rows(keep.bool()).to(w.device),
                       None if grid is None else grid.to(w.device)))
    batches = [split_batch(b) for b in (data if isinstance(data, (list, tuple)) else list(data))] if epochs else []
    if epochs and not batches:
        raise ValueError("the fine-tuning data is empty")

    def compressed(w, geom, keep, grid, ste: bool):
        rows = geom.as_rows(w)
        q = rows.detach() if grid is None else grid.quantize(rows.detach().float()).to(rows.dtype)
        # Straight through: the forward sees the grid point, the gradient reaches the latent weight.
        out = (rows + (q - rows).detach()) if ste else q
        return geom.from_rows(out * keep, w.shape)

    from torch.func import functional_call

    saved_state = ModelState(model)
    history: List[float] = []
    try:
        model.eval()
        for _, w, _, _, _ in layers:
            w.requires_grad_(True)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=lr)
        for _ in range(epochs):
            total, count = 0.0, 0
            for x, y in batches:
                sub = {pn: compressed(w, geom, keep, grid, True) for pn, w, geom, keep, grid in layers}
                if isinstance(x, Mapping):
                    out = functional_call(model, sub, (), dict(x))
                elif isinstance(x, (tuple, list)):
                    out = functional_call(model, sub, tuple(x))
                else:
                    out = functional_call(model, sub, (x,))
                loss = check_loss(loss_fn(out, y))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * count_samples(x)
                count += count_samples(x)
            history.append(total / count)
    finally:
        with torch.no_grad():
            for _, w, geom, keep, grid in layers:
                w.copy_(compressed(w, geom, keep, grid, False))
        saved_state.restore()
    return history
