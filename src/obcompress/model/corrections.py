"""Corrections after compression: BatchNorm re-estimation and statistics correction.

Compressing the weights shifts the distribution of every activation after them; a normalization
layer with frozen statistics or affine parameters then passes the shift on. Two remedies, both run
on the calibration data, without gradients, and leave every submodule in the train/eval mode it
was in:

- ``reestimate_batchnorm``: the running mean and variance of each BatchNorm become the statistics
  of its inputs over all calibration samples.
- ``statistics_correction``: the affine weight and bias of each normalization layer (BatchNorm,
  GroupNorm, LayerNorm) are set so that its outputs have, per channel, the mean and standard
  deviation the dense model's outputs have on the same data. A norm layer's output is an affine
  function of its normalized input per channel, so the match is exact; layers are corrected in
  execution order, each measured after the ones before it were corrected.

Memory: per norm layer, three float64 vectors of its channel count; activations are reduced as
they pass and never stored.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from .calibration import run_model

__all__ = ["NormStatistics", "correctable_norms", "norm_statistics", "reestimate_batchnorm", "statistics_correction"]

_NORMS = (_BatchNorm, nn.GroupNorm, nn.LayerNorm)


class _ChannelMoments:
    """Count, mean and sum of squared deviations per channel, merged batch by batch in float64.

    Each batch is reduced on its own (float32 is enough for one batch) and merged with the parallel
    update of Chan et al., which, unlike summing x and x^2, loses nothing when the mean is large
    next to the spread.
    """

    def __init__(self):
        self.n = 0
        self.mean: Optional[torch.Tensor] = None
        self.m2: Optional[torch.Tensor] = None

    def add(self, mean_b: torch.Tensor, var_b: torch.Tensor, n_b: int) -> None:
        mean_b = mean_b.detach().to(torch.float64)
        m2_b = var_b.detach().to(torch.float64) * n_b
        if self.mean is None:
            self.n, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        if mean_b.shape != self.mean.shape:
            raise ValueError(f"channel count changed between calls: {tuple(self.mean.shape)} then {tuple(mean_b.shape)}")
        n = self.n + n_b
        delta = mean_b.to(self.mean.device) - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b.to(self.m2.device) + delta.square() * (self.n * n_b / n)
        self.n = n

    def var(self, unbiased: bool = False) -> torch.Tensor:
        return self.m2 / (self.n - 1 if unbiased and self.n > 1 else self.n)


def _channel_moments(module: nn.Module, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Per-channel (mean, population variance, count) of ``y`` as ``module``'s affine sees it: channels
    on dim 1 for BatchNorm / GroupNorm, the ``normalized_shape`` elements for LayerNorm."""
    if isinstance(module, nn.LayerNorm):
        k = len(module.normalized_shape)
        flat = y.reshape(-1, *y.shape[y.dim() - k:]).flatten(1)
        var, mean = torch.var_mean(flat, dim=0, correction=0)
        return mean, var, flat.shape[0]
    if y.dim() < 2:
        raise ValueError(f"expected a (batch, channels, ...) tensor, got shape {tuple(y.shape)}")
    dims = [0] + list(range(2, y.dim()))
    var, mean = torch.var_mean(y, dim=dims, correction=0)
    return mean, var, y.numel() // y.shape[1]


def _check_finite(name: str, y: Any, what: str) -> torch.Tensor:
    if not isinstance(y, torch.Tensor) or not y.is_floating_point():
        raise ValueError(f"layer {name}: its {what} is not a floating-point tensor ({type(y).__name__})")
    if not torch.isfinite(y).all():
        bad = int((~torch.isfinite(y)).sum())
        raise ValueError(f"layer {name}: non-finite activations ({bad} NaN/inf values in its {what})")
    return y


class _Modes:
    """Remembers every submodule's train/eval flag, to put them back however the pass ended."""

    def __init__(self, model: nn.Module):
        self.saved = [(m, m.training) for m in model.modules()]

    def restore(self) -> None:
        for m, training in self.saved:
            m.training = training


def _batch_list(batches: Iterable[Any]) -> List[Any]:
    out = list(batches)
    if not out:
        raise ValueError("no calibration batches: corrections need at least one batch of model inputs")
    return out


# --------------------------------------------------------------------------------------------
# BatchNorm re-estimation


def reestimate_batchnorm(model: nn.Module, batches: Iterable[Any]) -> List[str]:
    """Reset and re-estimate the running statistics of every BatchNorm*d from ``batches``.

    One no-grad pass with the BatchNorm layers in train mode and everything else in eval mode, as
    in the usual re-estimation: each BatchNorm normalizes a batch by that batch's statistics, so the
    layers after it see inputs that do not depend on its stale running statistics. Its new
    ``running_mean`` / ``running_var`` are the per-channel mean and (unbiased) variance of its inputs
    over all calibration samples; unlike torch's ``momentum=None`` cumulative average of per-batch
    statistics, this weights every sample equally when batches differ in size and includes the
    spread between batch means in the variance. ``momentum`` is left as it was.

    Returns the names of the layers re-estimated. A BatchNorm that the model never calls keeps its
    statistics. On any error every BatchNorm keeps its old statistics.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    bns = OrderedDict(
        (n, m) for n, m in model.named_modules()
        if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None
    )
    if not bns:
        raise ValueError(f"{type(model).__name__} has no BatchNorm layer with running statistics to re-estimate")
    batches = _batch_list(batches)
    moments = {n: _ChannelMoments() for n in bns}
    saved = {n: (m.running_mean.clone(), m.running_var.clone(),
                 None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for n, m in bns.items()}

    def make_hook(name):
        acc = moments[name]

        def hook(module, args):
            x = _check_finite(name, args[0] if args else None, "input")
            if x.dim() < 2 or x.numel() // x.shape[1] < 2:
                raise ValueError(
                    f"layer {name}: BatchNorm re-estimation needs more than one value per channel in each "
                    f"calibration batch, got an input of shape {tuple(x.shape)}"
                )
            acc.add(*_channel_moments(module, x.detach()))
            return None

        return hook

    modes = _Modes(model)
    handles = []
    ok = False
    try:
        model.eval()
        for name, bn in bns.items():
            bn.reset_running_stats()
            bn.train()
            handles.append(bn.register_forward_pre_hook(make_hook(name)))
        with torch.no_grad():
            for batch in batches:
                run_model(model, batch)
        done = [n for n in bns if moments[n].n > 0]
        if not done:
            raise ValueError("no BatchNorm layer was called during re-estimation: the model never uses them")
        with torch.no_grad():
            for name, bn in bns.items():
                acc = moments[name]
                if acc.n == 0:
                    continue
                bn.running_mean.copy_(acc.mean.to(bn.running_mean))
                bn.running_var.copy_(acc.var(unbiased=True).to(bn.running_var))
        ok = True
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for name, bn in bns.items():
                if ok and moments[name].n > 0:
                    continue
                mean, var, count = saved[name]
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
                if count is not None:
                    bn.num_batches_tracked.copy_(count)
        modes.restore()
    return done


# --------------------------------------------------------------------------------------------
# Statistics correction


def correctable_norms(model: nn.Module) -> "OrderedDict[str, nn.Module]":
    """Normalization layers whose output statistics an affine change can set: BatchNorm*d,
    GroupNorm and LayerNorm with both a weight and a bias."""
    return OrderedDict(
        (n, m) for n, m in model.named_modules()
        if isinstance(m, _NORMS) and isinstance(getattr(m, "weight", None), torch.Tensor)
        and isinstance(getattr(m, "bias", None), torch.Tensor)
    )


@dataclass
class NormStatistics:
    """Per-channel output mean and standard deviation (population) of a model's norm layers.

    ``order`` lists the layers in the order the model first calls them; ``calls[b][name]`` is how
    often batch b called the layer (what lets a later pass stop early).
    """

    order: List[str]
    mean: Dict[str, torch.Tensor]
    std: Dict[str, torch.Tensor]
    calls: List[Dict[str, int]] = field(default_factory=list)


class _StopForward(BaseException):
    # A BaseException, so that a model's own `except Exception` cannot swallow it.
    pass


def _measure(model: nn.Module, modules: Mapping[str, nn.Module], batches: List[Any],
             expected: Optional[List[Dict[str, int]]] = None) -> Tuple[Dict[str, _ChannelMoments], List[str], List[Dict[str, int]]]:
    """One eval-mode pass: output moments of ``modules``, their first-call order and calls per batch.

    With ``expected`` call counts, a batch's forward is cut short once every measured layer has
    been called as often as expected: the rest of the network cannot change what was measured.
    """
    moments = {n: _ChannelMoments() for n in modules}
    order: List[str] = []
    calls: List[Dict[str, int]] = []
    current: Dict[str, int] = {}
    target: Dict[str, int] = {}

    def make_hook(name):
        acc = moments[name]

        def hook(module, args, output):
            y = _check_finite(name, output, "output")
            acc.add(*_channel_moments(module, y.detach()))
            if name not in order:
                order.append(name)
            current[name] = current.get(name, 0) + 1
            if target and all(current.get(n, 0) >= c for n, c in target.items()):
                raise _StopForward
            return None

        return hook

    handles = []
    try:
        for name, m in modules.items():
            handles.append(m.register_forward_hook(make_hook(name)))
        with torch.no_grad():
            for b, batch in enumerate(batches):
                current.clear()
                target.clear()
                if expected is not None:
                    target.update({n: expected[b].get(n, 0) for n in modules})
                    if any(c == 0 for c in target.values()):
                        target.clear()  # a layer this batch never reaches: run the whole forward
                try:
                    run_model(model, batch)
                except _StopForward:
                    pass
                calls.append(dict(current))
    finally:
        for h in handles:
            h.remove()
    return moments, order, calls


def norm_statistics(model: nn.Module, batches: Iterable[Any], names: Optional[Iterable[str]] = None) -> NormStatistics:
    """The output statistics of ``model``'s correctable norm layers (or of ``names``) on ``batches``:
    one no-grad pass in eval mode; train/eval flags restored. Take them from the dense model before
    compressing it in place, to correct it later without keeping a dense copy."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    norms = correctable_norms(model)
    if names is not None:
        names = list(names)
        for n in names:
            if n not in norms:
                raise ValueError(f"layer {n}: not a normalization layer with affine weight and bias in {type(model).__name__}")
        norms = OrderedDict((n, norms[n]) for n in names)
    if not norms:
        raise ValueError(f"{type(model).__name__} has no normalization layer with affine weight and bias to correct")
    batches = _batch_list(batches)
    modes = _Modes(model)
    try:
        model.eval()
        moments, order, calls = _measure(model, norms, batches)
    finally:
        modes.restore()
    return NormStatistics(
        order=order,
        mean={n: moments[n].mean for n in order},
        std={n: moments[n].var().sqrt() for n in order},
        calls=calls,
    )


def statistics_correction(
    model: nn.Module,
    dense: Union[nn.Module, NormStatistics],
    batches: Iterable[Any],
    *,
    min_std_ratio: float = 1e-6,
    one_pass: Optional[bool] = None,
) -> Dict[str, Tuple[float, float]]:
    """Correct the affine parameters of ``model``'s norm layers so that their outputs' per-channel
    mean and std on ``batches`` are those of the dense model (``dense``: the dense model itself, or
    its ``norm_statistics`` on the same batches).

    Layers are corrected in the order the dense model calls them, each one from a pass through the
    model with the layers before it already corrected (the pass stops after the layer). With output
    mean m and std s in the compressed model and m*, s* in the dense one, weight w and bias b become
    w s*/s and (b - m) s*/s + m*. A channel whose compressed std is below ``min_std_ratio`` s* (a
    channel the compression all but switched off) is only shifted: scaling it up would amplify noise.

    ``one_pass``: send all calibration samples through the model as one batch and correct every
    layer in flight, in its forward hook (its output's statistics are then those over all samples,
    so the result is the same as one pass per layer, at the cost of one forward). Needs tensor
    batches of one shape, and peak memory is that of a forward pass over all samples at once.
    None (default): one pass when the batches are tensors that concatenate into at most
    ``ONE_PASS_MAX_BYTES`` of inputs and every norm layer runs once per forward; else one pass per layer.

    Returns {layer: (max |mean - dense mean| over channels before, the same after)}, both measured.
    On an error no affine parameter is changed.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    batches = _batch_list(batches)
    if isinstance(dense, nn.Module):
        if dense is model:
            raise ValueError("statistics_correction needs the dense model (or its norm_statistics), not the model itself")
        dense = norm_statistics(dense, batches)
    elif not isinstance(dense, NormStatistics):
        raise ValueError(f"dense must be the dense nn.Module or its NormStatistics, got {type(dense).__name__}")
    if dense.calls and len(dense.calls) != len(batches):
        raise ValueError(f"the dense statistics were taken on {len(dense.calls)} batches, but {len(batches)} "
                         "batches were given: use the same calibration batches")

    norms = correctable_norms(model)
    for name in dense.order:
        m = norms.get(name)
        if m is None:
            raise ValueError(f"layer {name}: the dense model has this normalization layer but the model does not")
        if m.weight.numel() != dense.mean[name].numel():
            raise ValueError(f"layer {name}: {m.weight.numel()} channels, but {dense.mean[name].numel()} in the dense model")
    order = list(dense.order)
    if not order:
        raise ValueError("the dense model called no normalization layer on the calibration data: nothing to correct")
    expected = dense.calls or None

    joined = _one_batch(batches) if one_pass is not False else None
    once = not dense.calls or all(c == 1 for calls in dense.calls for c in calls.values())
    if one_pass and (joined is None or not once):
        raise ValueError("one_pass statistics correction needs tensor batches of one shape and norm layers "
                         "that run once per forward")
    if joined is not None and once and (one_pass or joined.numel() * joined.element_size() <= ONE_PASS_MAX_BYTES):
        return _correct_in_one_pass(model, dense, norms, joined, min_std_ratio)

    report: Dict[str, Tuple[float, float]] = {}
    modes = _Modes(model)
    # A failure half-way (non-finite outputs further on) puts back the layers already corrected.
    saved = {n: (norms[n].weight.detach().clone(), norms[n].bias.detach().clone()) for n in order}
    ok = False
    try:
        model.eval()
        prev: Optional[str] = None
        for name in order + [None]:
            # The pass that measures a layer before its correction also measures the previous layer
            # after its own: one pass per corrected layer, plus one at the end.
            measured = OrderedDict((n, norms[n]) for n in (prev, name) if n is not None)
            moments, _, _ = _measure(model, measured, batches, expected)
            if prev is not None:
                report[prev] = (report[prev][0], _max_shift(moments[prev], dense.mean[prev]))
            if name is not None:
                acc = moments[name]
                if acc.n == 0:
                    raise ValueError(f"layer {name}: the model never called it on the calibration data, "
                                     "but the dense model did")
                report[name] = (_max_shift(acc, dense.mean[name]), float("nan"))
                _set_affine(norms[name], acc, dense.mean[name], dense.std[name], min_std_ratio)
            prev = name
        ok = True
    finally:
        if not ok:
            _put_back(norms, saved)
        modes.restore()
    return report


ONE_PASS_MAX_BYTES = 512 << 20


def _one_batch(batches: List[Any]) -> Optional[torch.Tensor]:
    """All batches as one tensor, when they are tensors that concatenate; else None."""
    if not all(isinstance(b, torch.Tensor) and b.dim() >= 1 for b in batches):
        return None
    first = batches[0]
    if any(b.shape[1:] != first.shape[1:] or b.dtype != first.dtype or b.device != first.device for b in batches):
        return None
    return first if len(batches) == 1 else torch.cat(batches)


def _correct_in_one_pass(model, dense: NormStatistics, norms, x: torch.Tensor,
                         min_std_ratio: float) -> Dict[str, Tuple[float, float]]:
    order = list(dense.order)
    report: Dict[str, Tuple[float, float]] = {}
    saved = {n: (norms[n].weight.detach().clone(), norms[n].bias.detach().clone()) for n in order}
    modes = _Modes(model)
    done: List[str] = []

    def make_hook(name):
        def hook(module, args, output):
            y = _check_finite(name, output, "output")
            acc = _ChannelMoments()
            acc.add(*_channel_moments(module, y.detach()))
            before = _max_shift(acc, dense.mean[name])
            old_w = module.weight.detach().to(torch.float64).reshape(-1).clone()
            old_b = module.bias.detach().to(torch.float64).reshape(-1).clone()
            _set_affine(module, acc, dense.mean[name], dense.std[name], min_std_ratio)
            # The corrected output is an affine map of the old one per channel: y' = a y + c.
            a = module.weight.detach().to(torch.float64).reshape(-1) / torch.where(old_w == 0, torch.ones_like(old_w), old_w)
            a = torch.where(old_w == 0, torch.ones_like(a), a)
            c = module.bias.detach().to(torch.float64).reshape(-1) - a * old_b
            shape = [1] * y.dim()
            if isinstance(module, nn.LayerNorm):
                shape = [1] * (y.dim() - len(module.normalized_shape)) + list(module.normalized_shape)
            else:
                shape[1] = -1
            y2 = y * a.to(y.dtype).reshape(shape) + c.to(y.dtype).reshape(shape)
            after = _ChannelMoments()
            after.add(*_channel_moments(module, y2.detach()))
            report[name] = (before, _max_shift(after, dense.mean[name]))
            done.append(name)
            if len(done) == len(order):
                raise _StopForward  # nothing after the last norm layer can change what was corrected
            return y2

        return hook

    handles = []
    ok = False
    try:
        model.eval()
        for name in order:
            handles.append(norms[name].register_forward_hook(make_hook(name)))
        with torch.no_grad():
            try:
                run_model(model, x)
            except _StopForward:
                pass
        missing = [n for n in order if n not in report]
        if missing:
            raise ValueError(f"layer {missing[0]}: the model never called it on the calibration data, "
                             "but the dense model did")
        ok = True
    finally:
        for h in handles:
            h.remove()
        if not ok:
            _put_back(norms, saved)
        modes.restore()
    return OrderedDict((n, report[n]) for n in order)


def _put_back(norms, saved) -> None:
    with torch.no_grad():
        for n, (w, b) in saved.items():
            norms[n].weight.copy_(w)
            norms[n].bias.copy_(b)


def _max_shift(acc: _ChannelMoments, dense_mean: torch.Tensor) -> float:
    return float((acc.mean - dense_mean.to(acc.mean.device)).abs().max())


def _set_affine(module: nn.Module, acc: _ChannelMoments, mean_d: torch.Tensor, std_d: torch.Tensor,
                min_std_ratio: float) -> None:
    w, b = module.weight, module.bias
    dev = acc.mean.device
    mean_d, std_d = mean_d.to(dev, torch.float64), std_d.to(dev, torch.float64)
    std_c = acc.var().sqrt()
    scalable = std_c > min_std_ratio * std_d
    ratio = torch.where(scalable, std_d / torch.where(scalable, std_c, torch.ones_like(std_c)), torch.ones_like(std_c))
    w64 = w.detach().to(dev, torch.float64).reshape(-1)
    b64 = b.detach().to(dev, torch.float64).reshape(-1)
    with torch.no_grad():
        w.copy_((w64 * ratio).reshape(w.shape).to(w))
        b.copy_(((b64 - acc.mean) * ratio + mean_d).reshape(b.shape).to(b))
