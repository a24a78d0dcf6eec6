"""Activation quantization (the "A" of W+A settings): one per-tensor quantizer on each layer's input.

A quantizer is calibrated from the inputs the layer receives on the calibration data and is then
simulated in the forward pass: a forward pre-hook replaces the input x by its quantize-dequantize
``scale * (clamp(round(x / scale) + zero, 0, 2^bits - 1) - zero)``. The grid follows the weight
grids (``solvers.grid.minmax_params``): symmetric puts the zero point at 2^(bits-1); asymmetric
keeps 0.0 exactly representable, so a post-ReLU input spends all its levels on [0, max].

Memory during calibration: per layer, the running min and max and a uniform random sample of at
most ``max_samples`` input values (with ``mse=True`` only), whatever the amount of calibration data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Mapping, Optional, Union

import torch
import torch.nn as nn

from ..checks import check_bits, check_bool, check_int
from ..recipe import ActivationScheme
from ..solvers.grid import minmax_params
from .calibration import run_model
from .layers import LayerInfo

__all__ = [
    "ActivationHooks",
    "ActivationQuantizer",
    "attach",
    "calibrate_activation_quantizers",
    "quantizers_from_dict",
    "quantizers_to_dict",
]

# 2^18 values pin the p=2.4 optimum's clip ratio well below the search's 1 % step, and the
# 80-point search over them costs ~0.1 s per layer on one core (2^20 would cost ~0.35 s).
DEFAULT_MAX_SAMPLES = 2**18


@dataclass(frozen=True)
class ActivationQuantizer:
    """A per-tensor uniform quantizer: codes 0..2^bits-1, value = scale * (code - zero)."""

    scale: float
    zero: int
    bits: int
    symmetric: bool

    def __post_init__(self):
        _check_fields(self.scale, self.zero, self.bits, self.symmetric)

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    @classmethod
    def fit(cls, x: torch.Tensor, bits: int, symmetric: bool = True, mse: bool = False) -> "ActivationQuantizer":
        """The quantizer of the values in ``x`` (any shape): their min-max range, or with ``mse`` the
        range shrunk to minimise sum |x - q(x)|^2.4 over them."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError("ActivationQuantizer.fit needs a floating-point tensor")
        if x.numel() == 0:
            raise ValueError("ActivationQuantizer.fit needs at least one value")
        if not torch.isfinite(x).all():
            raise ValueError("ActivationQuantizer.fit: the values contain NaN or inf")
        check_bits(bits, "activation bits")
        scale, zero = minmax_params(x.detach().reshape(1, -1), bits, bool(symmetric), bool(mse))
        return cls(float(scale[0]), int(zero[0]), int(bits), bool(symmetric))

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes (int64) of the nearest representable values."""
        xf = x if x.dtype == torch.float32 else x.to(torch.float32)
        return torch.clamp(torch.round(xf / self.scale) + self.zero, 0, self.maxq).to(torch.int64)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize-dequantize ``x``; the result has x's dtype and device."""
        # float32 whatever x's dtype: bfloat16 keeps 8 significant bits, so x / scale would already
        # be rounded before round() and land on a neighbouring level; float32 is also what calibrated it.
        xf = x if x.dtype == torch.float32 else x.to(torch.float32)
        q = torch.clamp(torch.round(xf / self.scale) + self.zero, 0, self.maxq)
        return ((q - self.zero) * self.scale).to(x.dtype)

    def levels(self) -> torch.Tensor:
        """All 2^bits representable values, ascending (float32)."""
        return (torch.arange(self.maxq + 1, dtype=torch.float32) - self.zero) * self.scale

    def to_dict(self) -> Dict[str, Any]:
        return {"scale": self.scale, "zero": self.zero, "bits": self.bits, "symmetric": self.symmetric}

    @classmethod
    def from_dict(cls, d: Any) -> "ActivationQuantizer":
        if not isinstance(d, Mapping):
            raise ValueError(f"an activation quantizer must be a mapping, got {type(d).__name__}")
        keys = {"scale", "zero", "bits", "symmetric"}
        if set(d) != keys:
            raise ValueError(f"an activation quantizer has exactly the keys {sorted(keys)}, got {sorted(map(str, d))}")
        scale = d["scale"]
        # JSON writes a whole-number float such as 2.0 as 2 in some encoders.
        if isinstance(scale, int) and not isinstance(scale, bool):
            scale = float(scale)
        return cls(scale=scale, zero=d["zero"], bits=d["bits"], symmetric=d["symmetric"])


def _check_fields(scale: Any, zero: Any, bits: Any, symmetric: Any) -> None:
    check_bits(bits, "activation bits")
    check_bool(symmetric, "activation quantizer symmetric")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"activation quantizer scale must be a finite number > 0, got {scale!r}")
    maxq = 2**bits - 1
    check_int(zero, "activation quantizer zero", 0, maxq)
    if symmetric and zero != 2 ** (bits - 1):
        raise ValueError(f"a symmetric {bits}-bit activation quantizer has zero point {2 ** (bits - 1)}, got {zero}")


class _InputObserver:
    """Running min/max of a layer's inputs and, for the MSE search, a bounded uniform sample of them.

    The sample is bottom-k sampling: every value gets a random key and the ``max_samples`` values with
    the smallest keys are kept, which is a uniform sample without replacement of everything seen. Once
    the sample is full, only values whose key beats the largest kept key can enter, so a batch costs
    one comparison per value plus a top-k over the few that pass.
    """

    def __init__(self, name: str, scheme: ActivationScheme, max_samples: int, seed: int):
        self.name = name
        self.scheme = scheme
        self.max_samples = max_samples
        self.seed = seed
        self.lo = math.inf
        self.hi = -math.inf
        self.seen = 0
        self.values: Optional[torch.Tensor] = None
        self.keys: Optional[torch.Tensor] = None
        self._gen: Optional[torch.Generator] = None

    def add(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1)
        if flat.numel() == 0:
            return
        if not torch.isfinite(flat).all():
            bad = int((~torch.isfinite(flat)).sum())
            raise ValueError(
                f"layer {self.name}: non-finite activations ({bad} NaN/inf values in its input); "
                "the calibration data or an earlier layer overflowed"
            )
        lo, hi = torch.aminmax(flat)
        self.lo = min(self.lo, float(lo))
        self.hi = max(self.hi, float(hi))
        self.seen += flat.numel()
        if self.scheme.mse:
            self._sample(flat.to(torch.float32))

    def _sample(self, flat: torch.Tensor) -> None:
        if self._gen is None or self._gen.device != flat.device:
            self._gen = torch.Generator(device=flat.device)
            self._gen.manual_seed(self.seed)
        keys = torch.rand(flat.numel(), generator=self._gen, device=flat.device)
        if self.values is not None and self.values.device != flat.device:
            self.values, self.keys = self.values.to(flat.device), self.keys.to(flat.device)
        if self.values is not None and self.values.numel() >= self.max_samples:
            passing = keys < self.keys.max()
            flat, keys = flat[passing], keys[passing]
        if self.values is not None:
            flat = torch.cat([self.values, flat])
            keys = torch.cat([self.keys, keys])
        if flat.numel() > self.max_samples:
            keys, idx = torch.topk(keys, self.max_samples, largest=False, sorted=False)
            flat = flat[idx]
        self.values, self.keys = flat, keys

    def quantizer(self) -> ActivationQuantizer:
        if self.seen == 0:
            raise ValueError(
                f"layer {self.name}: received no inputs during activation calibration (its forward was never called)"
            )
        s = self.scheme
        if not s.mse:
            x = torch.tensor([self.lo, self.hi], dtype=torch.float32)
        else:
            # The search runs on the sample alone, an unbiased estimate of the error over all values;
            # adding the true extremes would weigh two outliers as ~max_samples/seen times as many.
            x = self.values.cpu()
        return ActivationQuantizer.fit(x, s.num_bits, s.symmetric, s.mse)


def _layer_input(name: str, args: tuple, kwargs: dict) -> torch.Tensor:
    x = args[0] if args else kwargs.get("input")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"layer {name}: its input is not a floating-point tensor ({type(x).__name__})")
    return x


def _as_scheme(name: str, scheme: Any) -> ActivationScheme:
    if isinstance(scheme, ActivationScheme):
        return scheme
    if isinstance(scheme, Mapping):
        try:
            return ActivationScheme.from_dict(scheme)
        except ValueError as e:
            raise ValueError(f"layer {name}: {e}") from None
    raise ValueError(f"layer {name}: expected an ActivationScheme, got {type(scheme).__name__}")


def calibrate_activation_quantizers(
    model: nn.Module,
    layers: Mapping[str, LayerInfo],
    schemes: Mapping[str, Union[ActivationScheme, Mapping]],
    batches: Iterable[Any],
    *,
    max_samples: int = DEFAULT_MAX_SAMPLES,
    seed: int = 0,
) -> Dict[str, ActivationQuantizer]:
    """One no-grad, eval-mode pass over ``batches``; a quantizer for each layer named in ``schemes``.

    Every layer sees the inputs the model produces as it stands (call this after the weights are
    compressed, so that the ranges are those of the compressed model). ``mse=True`` schemes search
    the clip range on a uniform sample of at most ``max_samples`` of the layer's input values; the
    sample is drawn with a generator seeded by ``seed``, so calibration is reproducible. The
    train/eval flag of every submodule is restored afterwards.
    """
    if not isinstance(schemes, Mapping) or not schemes:
        raise ValueError("calibrate_activation_quantizers needs a non-empty dict of layer name -> ActivationScheme")
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 2:
        raise ValueError(f"max_samples must be an integer >= 2, got {max_samples!r}")
    observers = {}
    for name, scheme in schemes.items():
        if name not in layers:
            raise ValueError(f"layer {name}: has an activation scheme but is not among the layers given")
        observers[name] = _InputObserver(name, _as_scheme(name, scheme), max_samples, seed)

    def make_hook(name):
        obs = observers[name]

        def hook(module, args, kwargs):
            obs.add(_layer_input(name, args, kwargs))
            return None

        return hook

    modes = [(m, m.training) for m in model.modules()]
    handles = []
    model.eval()
    try:
        for name in observers:
            handles.append(layers[name].module.register_forward_pre_hook(make_hook(name), with_kwargs=True))
        count = 0
        with torch.no_grad():
            for batch in batches:
                run_model(model, batch)
                count += 1
        if count == 0:
            raise ValueError("no calibration batches: activation calibration needs at least one batch of model inputs")
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training
    return {name: obs.quantizer() for name, obs in observers.items()}


class ActivationHooks:
    """The installed input quantizers of a model; ``remove()`` (or leaving a ``with`` block) takes
    them out again, after which the model computes exactly what it did before."""

    def __init__(self, handles: list, quantizers: Dict[str, ActivationQuantizer]):
        self._handles = handles
        self.quantizers = quantizers

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> "ActivationHooks":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def attach(
    model: nn.Module,
    layers: Optional[Mapping[str, Union[LayerInfo, nn.Module]]],
    quantizers: Mapping[str, ActivationQuantizer],
) -> ActivationHooks:
    """Install a forward pre-hook on each layer named in ``quantizers`` that fake-quantizes its input.

    ``layers`` maps names to LayerInfo (or modules); None looks each name up in ``model`` (what a
    model skeleton restored from an artifact needs). Every layer must be a submodule of ``model``.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(quantizers, Mapping) or not quantizers:
        raise ValueError("attach needs a non-empty dict of layer name -> ActivationQuantizer")
    owned = {id(m) for m in model.modules()}
    targets = []
    for name, q in quantizers.items():
        if not isinstance(q, ActivationQuantizer):
            raise ValueError(f"layer {name}: expected an ActivationQuantizer, got {type(q).__name__}")
        if layers is None:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"layer {name}: no such module in {type(model).__name__}") from None
        else:
            if name not in layers:
                raise ValueError(f"layer {name}: has an activation quantizer but is not among the layers given")
            entry = layers[name]
            module = entry.module if isinstance(entry, LayerInfo) else entry
            if not isinstance(module, nn.Module) or id(module) not in owned:
                raise ValueError(f"layer {name}: is not a module of the model given")
        targets.append((name, module, q))

    def make_hook(name, q):
        def hook(module, args, kwargs):
            if args:
                return (q(_layer_input(name, args, kwargs)),) + tuple(args[1:]), kwargs
            x = _layer_input(name, args, kwargs)
            return args, {**kwargs, "input": q(x)}

        return hook

    handles = []
    try:
        for name, module, q in targets:
            handles.append(module.register_forward_pre_hook(make_hook(name, q), with_kwargs=True))
    except BaseException:
        for h in handles:
            h.remove()
        raise
    return ActivationHooks(handles, dict(quantizers))


def quantizers_to_dict(quantizers: Mapping[str, ActivationQuantizer]) -> Dict[str, Dict[str, Any]]:
    """name -> plain dict (JSON-safe: floats, ints, bools) for artifacts."""
    return {name: q.to_dict() for name, q in quantizers.items()}


def quantizers_from_dict(d: Any) -> Dict[str, ActivationQuantizer]:
    """Inverse of ``quantizers_to_dict``; a malformed entry is a ValueError naming the layer."""
    if not isinstance(d, Mapping):
        raise ValueError(f"activation quantizers must be a mapping of layer name -> quantizer, got {type(d).__name__}")
    out = {}
    for name, entry in d.items():
        try:
            out[name] = ActivationQuantizer.from_dict(entry)
        except ValueError as e:
            raise ValueError(f"layer {name}: {e}") from None
    return out
