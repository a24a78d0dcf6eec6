"""FIT (Fisher-information sensitivity) and FITCompress-style path planning through compression space.

A layer configuration is chosen for a compression goal from first-order information only: the
empirical Fisher of the loss on labelled calibration data. The pieces and their exact definitions:

Empirical Fisher (``empirical_fisher``). For every weight i of the compressible layers,
``F_ii = E_samples[(d loss_n / d theta_i)^2]`` with ``loss_n`` one sample's loss, estimated as a
running mean over batches of one estimate per batch:

- ``mode="batch"``: ``B * g_i^2`` with ``g`` the gradient of the batch's *mean* loss over its B
  samples. Since ``E[g^2] = E[g_n^2] / B + (1 - 1/B) E[g_n]^2``, this is unbiased for the
  per-sample mean square where the expected per-sample gradient is zero (a trained model at a
  minimum of the calibration loss) and biased upwards by ``(B - 1) E[g_n]^2`` elsewhere.
- ``mode="per_sample"``: the exact ``mean_n g_n,i^2`` over the batch, per-sample gradients by
  ``torch.func`` (``functional_call`` + ``vmap`` + ``grad``, chunked to bound memory), or one
  backward per sample where the model cannot be vmapped (recorded in ``info["per_sample"]``).

The per-layer trace is ``Tr(F_l) = sum_{i in l} F_ii``. After each batch b >= 2 the relative
standard error of each layer's mean trace, ``std(t_l) / sqrt(b) / mean(t_l)`` over the per-batch
traces ``t_l``, is taken and its maximum over layers recorded (``Fisher.history``); estimation stops
at the first batch >= ``min_batches`` where it is below ``tol`` (``converged``), or at
``max_batches`` (the data are cycled when shorter). The model is evaluated in eval mode (dropout
off, normalisation statistics frozen): the Fisher of the model that will be deployed. Optional
activation traces: ``Tr(F_x,l) = mean_n ||d loss_n / d x_l,n||^2`` over the layer's input x;
with no interaction between the samples of a batch (eval mode), ``d loss_n / d x_n`` is exactly B
times the gradient of the mean loss, so this is exact in both modes.

FIT noise of a configuration (``fit_noise``). A layer at b bits is quantized on a per-channel
(per-row) symmetric min-max grid fitted to its *dense* weights (the grid ``QuantGrid.fit`` gives,
as the OBC database fits it before masking), step ``Delta_r = scale_r = 2 max|row r| / (2^b - 1)``.
Its FIT-importance mask prunes the weights of least ``F_ii theta_i^2``. Then

    FIT = sum_l [ sum_{i pruned} F_ii theta_i^2 + sum_{i kept} F_ii e(theta_i; Delta_row(i)) ]

per weight (the per-weight form of ``sum_l Tr(F_l) Delta_l^2 / 12``), with the uniform rounding
noise ``e = Delta^2 / 12``, except, by default (``zero_bin=True``), inside the zero bin: a weight
with ``|theta| < Delta / 2`` is rounded to the grid's exact zero, so its error is ``theta^2``, not
``Delta^2 / 12``. This is not only closer to what rounding does: it makes FIT monotone along every
move of the search (a kept weight never costs more than its pruned square; a coarser grid never
costs less), which is what makes the A* below exact. ``zero_bin=False`` gives the plain
``Delta^2 / 12`` model; a float layer (no bits) has no rounding noise.

``fit_perturbation`` is the same sum for actual compressed weights: ``sum_i F_ii (theta_i -
theta'_i)^2`` (a pruned weight counts ``theta_i^2``). Near a minimum the loss grows by about half
of it (the empirical Fisher approximates the Hessian there).

Path planning (``plan_path``). A state is one index per layer into the bit schedule (8, 6, 4, 3,
2 by default) and one index into the sparsity schedule (``1 - logspace(0, -2, 40)``: 0 ... 0.99),
global by default (one FIT-importance ranking over all searched layers; a layer's pruned count is
capped at the schedule's largest level, so no layer is removed whole) or one per layer. A move takes
one layer one step down its bit schedule, or the sparsity (of one layer, per layer) one step up.
Each state is the configuration ``Variant("unstructured", pruned_l / n_l, bits_l)`` per layer; its
cost is the goal's cost model summed over the layers; it meets the goal when that is at most
``fraction * dense``. The search minimises

    g = sum over the steps of |FIT(next) - FIT(current)|          (the path's Fisher length)
    priority = g + lam * h,   h = FIT(state) * max(0, cost(state) - budget) / dense

``mode="astar"`` is A* with an open list (a heap) and a closed set, stopping when a state meeting
the goal is popped. With ``lam = 0`` it is uniform-cost search and returns a goal state of least
path length; with the default ``zero_bin`` FIT is non-decreasing along every move, so the path
length telescopes to ``FIT(state) - FIT(start)`` and that state is the configuration of least FIT
among all that meet the goal (``zero_bin=False`` loses the telescoping: the result is the least
path length, which bounds the end state's FIT from above). ``h`` is the reference's heuristic
(remaining distance to the goal scaled by the current FIT); it is not a lower bound, so with
``lam > 0`` the result meets the goal but may be worse than the optimum, in exchange for far fewer
expansions. ``mode="beam"`` keeps the ``beam_width`` states of least priority at each depth; width
1 is the reference's greedy walk. The optional ``refresh(step)`` re-estimates the Fisher at each
expanded node (the reference's approximate mode); the steps out of that node are measured with it,
and no exactness is claimed then.

Applying a configuration: ``apply_rtn_fit`` (the paper's method without fine-tuning: round to
nearest on the grid above, FIT-importance mask), ``finetune`` (masks frozen, straight-through
quantization), or ``fit_recipe`` for ``obcompress.api.compress`` (the OBC solvers at the found
per-layer bits and sparsity).
"""

from __future__ import annotations

import heapq
import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from ..model.calibration import count_samples, run_model
from ..model.layers import find_layers
from ..solvers._common import num_pruned
from ..solvers.grid import QuantGrid
from .costs import CostModel
from .nonuniform import Configuration, Goal, parse_goal
from .space import LayerGeometry, Variant, configuration_recipe

__all__ = [
    "DEFAULT_BITS",
    "DEFAULT_SPARSITY",
    "Fisher",
    "FitPath",
    "PathStep",
    "apply_rtn_fit",
    "empirical_fisher",
    "finetune",
    "fit_masks",
    "fit_noise",
    "fit_perturbation",
    "fit_recipe",
    "plan_path",
]

DEFAULT_BITS: Tuple[int, ...] = (8, 6, 4, 3, 2)
DEFAULT_SPARSITY: Tuple[float, ...] = tuple(float(s) for s in 1.0 - np.logspace(0, -2, 40))

# Per-sample gradients are materialised for at most this many floats at a time (64 MiB).
_PER_SAMPLE_FLOATS = 1 << 24


# ---------------------------------------------------------------------------------------------
# small helpers


def _map(fn: Callable[[torch.Tensor], Any], obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        return {k: _map(fn, v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        vals = [_map(fn, v) for v in obj]
        return type(obj)(*vals) if hasattr(obj, "_fields") else tuple(vals)
    if isinstance(obj, list):
        return [_map(fn, v) for v in obj]
    return obj


def _split_batch(batch: Any) -> Tuple[Any, Any]:
    """(model inputs, targets) of a labelled batch."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        x, y = batch
    elif isinstance(batch, Mapping) and "labels" in batch:
        x, y = {k: v for k, v in batch.items() if k != "labels"}, batch["labels"]
    else:
        raise ValueError(
            f"the Fisher needs labelled batches: (inputs, targets) pairs or dicts with 'labels'; got a "
            f"{type(batch).__name__}" + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""))
    if y is None:
        raise ValueError("a calibration batch has targets None: the Fisher needs labels")
    return x, y


class _Cycle:
    """Batches of ``data`` in order, then again from the first (the ones seen are kept for that,
    so a generator can be cycled too)."""

    def __init__(self, data: Any):
        if isinstance(data, torch.Tensor):
            raise ValueError("the Fisher needs labelled batches ((inputs, targets) pairs), got a bare tensor")
        if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
            data = torch.utils.data.DataLoader(data, batch_size=32)
        try:
            self._it: Optional[Any] = iter(data)
        except TypeError:
            raise ValueError(f"data must be an iterable of (inputs, targets) batches, got {type(data).__name__}") from None
        self._seen: List[Any] = []
        self._pos = 0
        self.cycled = False

    def next(self) -> Any:
        if self._it is not None:
            try:
                batch = next(self._it)
                self._seen.append(batch)
                return batch
            except StopIteration:
                self._it = None
                if not self._seen:
                    raise ValueError("the calibration data is empty") from None
                self.cycled = True
        batch = self._seen[self._pos % len(self._seen)]
        self._pos += 1
        return batch


def _int_arg(name: str, value: Any, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    return int(value)


def _rows(geom: LayerGeometry, t: torch.Tensor) -> torch.Tensor:
    """A weight-shaped tensor as (groups * rows, cols): one quantization channel per row."""
    if geom.kind == "conv1d_hf":
        return t.t()  # transformers' Conv1D stores (in, out)
    return t.reshape(geom.groups * geom.rows, geom.cols)


def _unrows(geom: LayerGeometry, t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if geom.kind == "conv1d_hf":
        return t.t()
    return t.reshape(shape)


# ---------------------------------------------------------------------------------------------
# empirical Fisher


@dataclass
class Fisher:
    """The diagonal empirical Fisher of the compressible layers (see the module docstring).

    ``diag``: F_ii per layer in the weight's own shape (float32); ``traces``: Tr(F_l);
    ``geometries``: each layer's ``LayerGeometry`` (positions measured on the first batch), what the
    cost models need; ``history``: one entry per batch with the running mean of the total trace and
    the largest relative standard error of a layer's mean trace, ``rel_err`` (None before the second
    batch), and the layer it belongs to.
    """

    diag: Dict[str, torch.Tensor]
    traces: Dict[str, float]
    geometries: Dict[str, LayerGeometry]
    batches: int
    samples: int
    mode: str
    tol: float
    converged: bool
    history: List[Dict[str, Any]] = field(default_factory=list)
    activation_traces: Optional[Dict[str, float]] = None
    info: Dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> List[str]:
        return list(self.diag)

    @property
    def trace(self) -> float:
        return float(sum(self.traces.values()))

    @property
    def rel_err(self) -> Optional[float]:
        """The stopping statistic after the last batch."""
        return self.history[-1]["rel_err"] if self.history else None


def _rel_err(sums: np.ndarray, sq: np.ndarray, n: int) -> Tuple[float, int]:
    """Largest relative standard error of the mean per-batch trace over layers, and its layer."""
    mean = sums / n
    var = np.maximum(sq / n - mean ** 2, 0.0) * n / (n - 1)
    se = np.sqrt(var / n)
    # A layer whose every trace is zero has nothing left to estimate.
    rel = np.where(mean > 0, se / np.where(mean > 0, mean, 1.0), np.where(se > 0, np.inf, 0.0))
    k = int(np.argmax(rel))
    return float(rel[k]), k


def _check_loss(loss: Any) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.is_floating_point():
        raise ValueError(f"loss_fn must return a scalar floating tensor (the batch's mean loss), got "
                         f"{type(loss).__name__}" + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else ""))
    if not loss.requires_grad:
        raise ValueError("the loss does not depend on the model's weights (no gradient): loss_fn must use the output")
    if not torch.isfinite(loss).all():
        raise ValueError(f"the loss is not finite ({float(loss.detach())}) on a calibration batch")
    return loss.reshape(())


class _ModelState:
    """The train/eval flags, requires_grad and .grad of a model, to put back however a pass ended."""

    def __init__(self, model: nn.Module):
        self.training = {m: m.training for m in model.modules()}
        self.requires = {p: p.requires_grad for p in model.parameters()}
        self.grads = {p: p.grad for p in model.parameters()}

    def restore(self) -> None:
        for m, t in self.training.items():
            m.training = t
        for p, r in self.requires.items():
            p.requires_grad_(r)
        for p, gr in self.grads.items():
            p.grad = gr


def empirical_fisher(
    model: nn.Module,
    data: Iterable,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    *,
    layers: Union[None, str, Sequence[str]] = None,
    min_batches: int = 4,
    max_batches: int = 64,
    tol: float = 0.05,
    mode: str = "batch",
    activations: bool = False,
) -> Fisher:
    """The diagonal empirical Fisher of ``model``'s compressible layers on labelled ``data``.

    ``data``: an iterable of ``(inputs, targets)`` batches (or dicts with ``labels``); inputs go to
    the model as ``run_model`` passes them. ``loss_fn(output, targets)`` is the batch's mean loss.
    ``layers``: targets as ``find_layers`` reads them (None: every compressible layer). The model
    is left as it was: training flags, ``requires_grad`` and ``.grad`` of every parameter.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if loss_fn is None or not callable(loss_fn):
        raise ValueError("the Fisher needs a loss: loss_fn(output, targets) -> the batch's mean loss")
    if mode not in ("batch", "per_sample"):
        raise ValueError(f"mode must be 'batch' or 'per_sample', got {mode!r}")
    min_batches = _int_arg("min_batches", min_batches, 2)
    max_batches = _int_arg("max_batches", max_batches, 2)
    if min_batches > max_batches:
        raise ValueError(f"min_batches ({min_batches}) exceeds max_batches ({max_batches})")
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not (0 < tol < math.inf):
        raise ValueError(f"tol must be a positive number, got {tol!r}")
    infos = find_layers(model, layers)
    names = list(infos)
    source = _Cycle(data)

    weights = [info.module.weight for info in infos.values()]
    param_name = {id(p): n for n, p in model.named_parameters()}
    missing = [n for n, w in zip(names, weights) if id(w) not in param_name]
    if missing:
        raise ValueError(f"layers {missing[:5]}: their weight is not a parameter of the model")
    wnames = [param_name[id(w)] for w in weights]

    saved_state = _ModelState(model)
    L = len(names)
    sums = {n: torch.zeros(w.shape, dtype=torch.float64, device=w.device) for n, w in zip(names, weights)}
    tr_sum, tr_sq = np.zeros(L), np.zeros(L)
    act_sum = np.zeros(L)
    history: List[Dict[str, Any]] = []
    info: Dict[str, Any] = {}
    positions: Dict[str, float] = {}
    seen = np.zeros(L, dtype=bool)
    samples = n = 0
    converged = False
    try:
        model.eval()
        for w in weights:
            w.requires_grad_(True)
        while True:
            x, y = _split_batch(source.next())
            B = count_samples(x)
            if B < 1:
                raise ValueError("a calibration batch has no samples")
            if n == 0:
                positions = _positions(model, infos, x, B)
            if mode == "batch" or activations:
                g, act = _batch_grads(model, infos, weights, x, y, loss_fn, with_inputs=activations,
                                      want_weights=mode == "batch")
                if activations:
                    act_sum += np.array([B * a for a in act])
            if mode == "batch":
                est = [B * t.double() ** 2 if t is not None else None for t in g]
            else:
                est = _per_sample_squares(model, weights, wnames, x, y, B, loss_fn, info)
            traces = np.zeros(L)
            for k, (name, e) in enumerate(zip(names, est)):
                if e is None:
                    continue
                seen[k] = True
                sums[name] += e
                traces[k] = float(e.sum())
            tr_sum += traces
            tr_sq += traces ** 2
            n += 1
            samples += B
            rel, worst = _rel_err(tr_sum, tr_sq, n) if n >= 2 else (None, None)
            history.append({"batches": n, "samples": samples, "rel_err": rel,
                            "worst": None if worst is None else names[worst],
                            "trace": float(tr_sum.sum() / n)})
            if n >= min_batches and rel is not None and rel < tol:
                converged = True
                break
            if n >= max_batches:
                break
    finally:
        saved_state.restore()
    if not seen.all():
        idle = [nm for nm, s in zip(names, seen) if not s]
        raise ValueError(f"layers {idle[:5]} took no part in the loss (no gradient on any batch): leave them out "
                         "with layers=...")
    diag = {nm: (sums[nm] / n).to("cpu", torch.float32) for nm in names}
    geoms = {}
    for nm, li in infos.items():
        geoms[nm] = LayerGeometry(name=nm, kind=li.kind, groups=li.groups, rows=li.rows, cols=li.cols, taps=li.taps,
                                  positions=positions.get(nm) or 1.0,
                                  has_bias=getattr(li.module, "bias", None) is not None)
    info["cycled"] = source.cycled
    return Fisher(
        diag=diag, traces={nm: float(diag[nm].double().sum()) for nm in names}, geometries=geoms, batches=n,
        samples=samples, mode=mode, tol=float(tol), converged=converged, history=history,
        activation_traces={nm: float(a / n) for nm, a in zip(names, act_sum)} if activations else None, info=info)


def _positions(model: nn.Module, infos, x: Any, B: int) -> Dict[str, float]:
    """Output positions per sample of each layer (tokens, pixels), summed over its calls."""
    out: Dict[str, float] = {nm: 0.0 for nm in infos}

    def hook_for(nm, li):
        def hook(module, args, output):
            if isinstance(output, torch.Tensor) and output.numel():
                out[nm] += output.numel() / (li.groups * li.rows) / B
        return hook

    handles = [li.module.register_forward_hook(hook_for(nm, li)) for nm, li in infos.items()]
    try:
        with torch.no_grad():
            run_model(model, x)
    finally:
        for h in handles:
            h.remove()
    return out


def _batch_grads(model, infos, weights, x, y, loss_fn, *, with_inputs: bool, want_weights: bool):
    """Gradients of the batch's mean loss w.r.t. the layer weights and (optionally) the sum of
    squares of those w.r.t. each layer's inputs."""
    inputs: Dict[int, List[torch.Tensor]] = {k: [] for k in range(len(infos))}
    handles = []
    if with_inputs:
        def pre_for(k):
            def pre(module, args):
                if not args or not isinstance(args[0], torch.Tensor) or not args[0].is_floating_point():
                    return None
                a = args[0]
                # A fresh node per call, so that its gradient is this layer's share only (an
                # input shared by several layers would otherwise sum all their gradients).
                a = a.view_as(a) if a.requires_grad else a.detach().requires_grad_(True)
                inputs[k].append(a)
                return (a,) + tuple(args[1:])
            return pre

        handles = [li.module.register_forward_pre_hook(pre_for(k)) for k, li in enumerate(infos.values())]
    try:
        loss = _check_loss(loss_fn(run_model(model, x), y))
    finally:
        for h in handles:
            h.remove()
    wrt = list(weights) if want_weights else []
    flat_inputs = [a for k in range(len(infos)) for a in inputs[k]]
    g = torch.autograd.grad(loss, wrt + flat_inputs, allow_unused=True)
    wg = [None if t is None else t.detach() for t in g[: len(wrt)]]
    act = []
    pos = len(wrt)
    for k in range(len(infos)):
        s = 0.0
        for _ in inputs[k]:
            t = g[pos]
            pos += 1
            if t is not None:
                s += float(t.double().pow(2).sum())
        act.append(s)
    return wg, act


def _per_sample_squares(model, weights, wnames, x, y, B, loss_fn, info) -> List[Optional[torch.Tensor]]:
    """mean over the batch of each sample's squared weight gradient."""
    if info.get("per_sample") != "loop":
        try:
            out = _vmap_squares(model, wnames, x, y, B, loss_fn)
            info["per_sample"] = "vmap"
            return out
        except ValueError:
            raise
        except Exception as e:  # functorch refuses some models (in-place ops, data-dependent flow)
            info["per_sample"] = "loop"
            info["vmap_error"] = f"{type(e).__name__}: {e}"[:300]
    acc = [torch.zeros(w.shape, dtype=torch.float64, device=w.device) for w in weights]
    for i in range(B):
        xi = _map(lambda t: t[i:i + 1], x)
        yi = _map(lambda t: t[i:i + 1], y)
        loss = _check_loss(loss_fn(run_model(model, xi), yi))
        g = torch.autograd.grad(loss, weights, allow_unused=True)
        for a, t in zip(acc, g):
            if t is not None:
                a += t.detach().double() ** 2
    return [a / B for a in acc]


def _vmap_squares(model, wnames, x, y, B, loss_fn) -> List[torch.Tensor]:
    from torch.func import functional_call, grad, vmap

    state = {k: v.detach() for k, v in model.named_parameters()}
    state.update(dict(model.named_buffers()))
    unique = list(dict.fromkeys(wnames))
    w = {k: state[k] for k in unique}
    total = sum(state[k].numel() for k in unique)

    def one(wd, xi, yi):
        xb = _map(lambda t: t.unsqueeze(0), xi)
        yb = _map(lambda t: t.unsqueeze(0), yi)
        st = dict(state)
        st.update(wd)
        if isinstance(xb, Mapping):
            outp = functional_call(model, st, (), dict(xb))
        elif isinstance(xb, (tuple, list)):
            outp = functional_call(model, st, tuple(xb))
        else:
            outp = functional_call(model, st, (xb,))
        loss = loss_fn(outp, yb)
        return loss.reshape(())

    chunk = max(1, min(B, _PER_SAMPLE_FLOATS // max(total, 1)))
    g = vmap(grad(one), in_dims=(None, 0, 0), chunk_size=chunk)(w, x, y)
    sq = {k: (g[k].double() ** 2).mean(0) for k in unique}
    return [sq[k] for k in wnames]


# ---------------------------------------------------------------------------------------------
# FIT


def _check_fisher(fisher: Any) -> Fisher:
    if not isinstance(fisher, Fisher):
        raise ValueError(f"fisher must be a Fisher (see empirical_fisher), got {type(fisher).__name__}")
    return fisher


def _weights(fisher: Fisher, source: Any, names: Sequence[str], what: str = "weights") -> Dict[str, torch.Tensor]:
    """The weights of ``names`` from a model or a {name: tensor} mapping, checked against the Fisher."""
    if isinstance(source, nn.Module):
        modules = dict(source.named_modules())
        out = {}
        for nm in names:
            m = modules.get(nm)
            w = getattr(m, "weight", None) if m is not None else None
            if not isinstance(w, torch.Tensor):
                raise ValueError(f"layer {nm!r}: the model has no such layer with a weight")
            out[nm] = w.detach().cpu()
    elif isinstance(source, Mapping):
        out = {}
        for nm in names:
            if nm not in source:
                raise ValueError(f"{what}: no tensor for layer {nm!r}")
            w = source[nm]
            if not isinstance(w, torch.Tensor):
                raise ValueError(f"{what}: layer {nm!r} is a {type(w).__name__}, not a tensor")
            out[nm] = w.detach().cpu()
    else:
        raise ValueError(f"{what} must be a model or a {{layer: tensor}} mapping, got {type(source).__name__}")
    for nm, w in out.items():
        if nm not in fisher.diag:
            raise ValueError(f"layer {nm!r} has no Fisher (the Fisher holds {len(fisher.diag)} layers)")
        if tuple(w.shape) != tuple(fisher.diag[nm].shape):
            raise ValueError(f"layer {nm!r}: {what} have shape {tuple(w.shape)}, the Fisher {tuple(fisher.diag[nm].shape)}")
        if not w.is_floating_point() or not torch.isfinite(w).all():
            raise ValueError(f"layer {nm!r}: {what} must be finite floating-point values")
    return out


def _noise(F: torch.Tensor, W: torch.Tensor, scale: torch.Tensor, zero_bin: bool) -> torch.Tensor:
    """Per-weight rounding noise F * e(theta; Delta) on rows (float64), ``scale`` one step per row."""
    delta = scale.reshape(-1, 1).double().expand_as(W)
    e = delta ** 2 / 12
    if zero_bin:
        e = torch.where(W.abs() < delta / 2, W ** 2, e)
    return F * e


def _steps(W_rows: torch.Tensor, bits: int) -> torch.Tensor:
    return QuantGrid.fit(W_rows.to(torch.float32), bits, symmetric=True, strategy="channel").scale[:, 0]


def _as_variant(name: str, v: Any) -> Variant:
    v = v if isinstance(v, Variant) else Variant.from_key(v)
    if v.pruned and v.kind != "unstructured":
        raise ValueError(f"layer {name!r}: variant {v.key}: FIT masks are unstructured (by F_ii theta_i^2), "
                         f"not {v.structure}")
    return v


def fit_masks(
    fisher: Fisher,
    weights: Any,
    sparsity: Union[float, Mapping[str, float]],
    *,
    max_layer_sparsity: Optional[float] = None,
) -> Dict[str, torch.Tensor]:
    """FIT-importance masks (bool, True = kept, in each weight's shape).

    A number: one global level over the Fisher's layers, the ``num_pruned(s, N)`` weights of least
    ``F_ii theta_i^2`` over all of them, each layer's count capped at ``num_pruned(max_layer_sparsity,
    n_l)`` (and n_l - 1) when that is given. A mapping {layer: level}: each layer ranks its own weights.
    Ties are broken in layer order, then by position in the (groups x rows, cols) layout, the same
    order everywhere, so that a layer given its count of a global mask gets exactly its share of it.
    """
    fisher = _check_fisher(fisher)
    per_layer = isinstance(sparsity, Mapping)
    names = list(sparsity) if per_layer else fisher.names
    W = _weights(fisher, weights, names)
    imps = [_importance(fisher, nm, W[nm]) for nm in names]
    if per_layer:
        counts = [num_pruned(_level(f"layer {nm!r} sparsity", sparsity[nm]), imp.numel()) for nm, imp in zip(names, imps)]
    else:
        s = _level("sparsity", sparsity)
        cap = None if max_layer_sparsity is None else _level("max_layer_sparsity", max_layer_sparsity)
        counts = _global_counts(imps, [s], cap)[0]
    out = {}
    for nm, imp, k in zip(names, imps, counts):
        keep = torch.ones(imp.numel(), dtype=torch.bool)
        keep[torch.argsort(imp, stable=True)[:k]] = False
        geom = fisher.geometries[nm]
        out[nm] = _unrows(geom, keep.reshape(geom.groups * geom.rows, geom.cols), W[nm].shape)
    return out


def _importance(fisher: Fisher, nm: str, W: torch.Tensor) -> torch.Tensor:
    """F_ii theta_i^2, flattened in the (groups x rows, cols) layout (float64)."""
    geom = fisher.geometries[nm]
    return (_rows(geom, fisher.diag[nm]).double() * _rows(geom, W).double() ** 2).flatten()


def _level(what: str, s: Any) -> float:
    if isinstance(s, bool) or not isinstance(s, numbers.Real) or not 0 <= s < 1 or math.isnan(s):
        raise ValueError(f"{what} must be a number in [0, 1), got {s!r}")
    return float(s)


def _global_counts(imps: Sequence[torch.Tensor], levels: Sequence[float], cap: Optional[float]) -> List[List[int]]:
    """Per level, each layer's number of weights among the globally least important."""
    sizes = [t.numel() for t in imps]
    owner = torch.repeat_interleave(torch.arange(len(imps)), torch.tensor(sizes))
    order = torch.argsort(torch.cat(list(imps)), stable=True)
    ranked_owner = owner[order]
    total = sum(sizes)
    out = []
    for s in levels:
        K = num_pruned(s, total)
        c = torch.bincount(ranked_owner[:K], minlength=len(imps)).tolist()
        if cap is not None:
            c = [min(k, num_pruned(cap, n), n - 1) for k, n in zip(c, sizes)]
        out.append(c)
    return out


def fit_noise(
    fisher: Fisher,
    choice: Mapping[str, Union[Variant, str]],
    weights: Any,
    *,
    zero_bin: bool = True,
    masks: Optional[Mapping[str, torch.Tensor]] = None,
) -> float:
    """FIT of a configuration: ``sum_l [sum_pruned F theta^2 + sum_kept F e(theta; Delta)]`` (module
    docstring). Each layer's mask prunes ``num_pruned(v.sparsity, n_l)`` of its weights of least
    ``F theta^2`` (the layer's share of a global mask, when the choice came from one), unless
    ``masks`` (True = kept) gives it. A layer of the Fisher not in ``choice`` is not counted."""
    fisher = _check_fisher(fisher)
    if not isinstance(choice, Mapping) or not choice:
        raise ValueError("choice must be a non-empty {layer: Variant} mapping")
    variants = {nm: _as_variant(nm, v) for nm, v in choice.items()}
    W = _weights(fisher, weights, list(variants))
    if masks is None:
        masks = fit_masks(fisher, W, {nm: v.sparsity for nm, v in variants.items()})
    total = 0.0
    for nm, v in variants.items():
        geom = fisher.geometries[nm]
        keep = masks.get(nm) if isinstance(masks, Mapping) else None
        if not isinstance(keep, torch.Tensor) or keep.shape != W[nm].shape:
            raise ValueError(f"layer {nm!r}: masks must give a bool tensor of the weight's shape {tuple(W[nm].shape)}")
        F = _rows(geom, fisher.diag[nm]).double()
        Wr = _rows(geom, W[nm]).double()
        kr = _rows(geom, keep.bool())
        total += float((F * Wr ** 2)[~kr].sum())
        if v.bits is not None:
            total += float(_noise(F, Wr, _steps(Wr, v.bits), zero_bin)[kr].sum())
    return total


def fit_perturbation(fisher: Fisher, original_weights: Any, compressed_weights: Any) -> float:
    """``sum_i F_ii (theta_i - theta'_i)^2`` over the Fisher's layers (models or {layer: tensor})."""
    fisher = _check_fisher(fisher)
    a = _weights(fisher, original_weights, fisher.names, "original weights")
    b = _weights(fisher, compressed_weights, fisher.names, "compressed weights")
    return float(sum((fisher.diag[nm].double() * (a[nm].double() - b[nm].double()) ** 2).sum() for nm in fisher.names))


# ---------------------------------------------------------------------------------------------
# path planning


@dataclass
class PathStep:
    """One state of a path: per-layer bits and sparsity (the global level, or per layer), the
    configuration it stands for, its FIT, its cost (fraction of dense) and the path length g."""

    bits: Dict[str, int]
    sparsity: Union[float, Dict[str, float]]
    choice: Dict[str, Variant]
    fit: float
    cost: float
    fraction: float
    g: float

    def to_dict(self) -> Dict[str, Any]:
        return {"bits": dict(self.bits), "sparsity": self.sparsity, "choice": {n: v.key for n, v in self.choice.items()},
                "fit": self.fit, "cost": self.cost, "fraction": self.fraction, "g": self.g}


@dataclass
class FitPath:
    """The configuration ``plan_path`` found and the path to it (``path[0]`` the start)."""

    choice: Dict[str, Variant]
    path: List[PathStep]
    fit: float
    g: float
    cost: float
    dense_cost: float
    goal: Goal
    mode: str
    lam: float
    expansions: int
    seconds: float
    info: Dict[str, Any] = field(default_factory=dict)

    @property
    def reduction(self) -> float:
        return self.dense_cost / self.cost if self.cost > 0 else math.inf

    def recipe(self, *, activation_bits: Optional[int] = None) -> Dict[str, Any]:
        return fit_recipe(self.choice, activation_bits=activation_bits)

    def configuration(self) -> Configuration:
        return Configuration(choice=dict(self.choice), cost=self.cost, dense_cost=self.dense_cost, score=self.fit,
                             method=f"fit-{self.mode}", goal=self.goal,
                             info={"g": self.g, "lam": self.lam, "expansions": self.expansions, "seconds": self.seconds,
                                   **self.info})

    def to_dict(self) -> Dict[str, Any]:
        return {"mode": self.mode, "lam": self.lam, "goal": {"cost": self.goal.cost.to_dict(), "fraction": self.goal.fraction},
                "fit": self.fit, "g": self.g, "cost": self.cost, "dense_cost": self.dense_cost,
                "reduction": self.reduction, "expansions": self.expansions, "seconds": self.seconds,
                "choice": {n: v.key for n, v in self.choice.items()}, "path": [s.to_dict() for s in self.path],
                "info": self.info}


def _bits_schedule(bits: Any) -> Tuple[int, ...]:
    try:
        out = tuple(bits)
    except TypeError:
        raise ValueError(f"bits must be a sequence of bit widths, got {bits!r}") from None
    if not out:
        raise ValueError("the bit schedule is empty")
    for b in out:
        if isinstance(b, bool) or not isinstance(b, numbers.Integral) or not 2 <= b <= 8:
            raise ValueError(f"bit widths must be integers in 2..8, got {b!r} in {list(out)}")
    if any(a <= b for a, b in zip(out, out[1:])):
        raise ValueError(f"the bit schedule must be strictly decreasing (each move takes a layer one step down), "
                         f"got {list(out)}")
    return tuple(int(b) for b in out)


def _sparsity_schedule(levels: Any) -> Tuple[float, ...]:
    try:
        out = tuple(float(s) for s in levels)
    except (TypeError, ValueError):
        raise ValueError(f"sparsity must be a sequence of levels in [0, 1), got {levels!r}") from None
    if not out:
        raise ValueError("the sparsity schedule is empty")
    for s in out:
        # A variant keeps 4 decimals: 0.99995 and above would read as a fully pruned layer.
        if not 0 <= s <= 0.9999:
            raise ValueError(f"sparsity levels must be in [0, 0.9999], got {s!r}")
    if any(a >= b for a, b in zip(out, out[1:])):
        raise ValueError(f"the sparsity schedule must be strictly increasing, got {[round(s, 4) for s in out]}")
    return out


class _LayerTable:
    """One layer's FIT at each (pruned count, bits) the search can reach. Weights are ranked once by
    importance and only the cumulative sums at the reachable counts are kept (a few floats per
    level and bit width instead of several copies of the layer)."""

    def __init__(self, F: torch.Tensor, W: torch.Tensor, zero_bin: bool, bits: Sequence[int], ks: Iterable[int]):
        imp = (F * W ** 2).flatten()
        self.n = imp.numel()
        order = torch.argsort(imp, stable=True)
        at = sorted(set(ks))
        self.pos = {k: i for i, k in enumerate(at)}
        idx = torch.tensor(at, dtype=torch.long)

        def cum(v):
            return torch.cat([v.new_zeros(1), torch.cumsum(v[order], 0)])

        self.pruned = cum(imp)[idx].tolist()
        self.kept: Dict[int, List[float]] = {}
        for b in bits:
            c = cum(_noise(F, W, _steps(W, b), zero_bin).flatten())
            self.kept[b] = (c[-1] - c[idx]).tolist()

    def term(self, k: int, bits: int) -> float:
        i = self.pos[k]
        return self.pruned[i] + self.kept[bits][i]


class _Space:
    """States, moves, FIT and cost of the search under one Fisher."""

    def __init__(self, fisher: Fisher, W: Dict[str, torch.Tensor], names: List[str], geoms, bits, levels,
                 per_layer: bool, cost: CostModel, zero_bin: bool, cost_cache: Dict):
        self.names, self.bits, self.levels, self.per_layer = names, bits, levels, per_layer
        self.geoms, self.cost_model, self.cost_cache = geoms, cost, cost_cache
        self.sizes = [geoms[nm].weights for nm in names]
        if per_layer:
            self.counts = None
            self.layer_counts = [[min(num_pruned(s, n), n - 1) for s in levels] for n in self.sizes]
            ks = self.layer_counts
        else:
            imps = [_importance(fisher, nm, W[nm]) for nm in names]
            self.counts = _global_counts(imps, levels, levels[-1])
            del imps
            ks = [[c[l] for c in self.counts] for l in range(len(names))]
        self.tables = []
        for l, nm in enumerate(names):
            g = geoms[nm]
            self.tables.append(_LayerTable(_rows(g, fisher.diag[nm]).double(), _rows(g, W[nm]).double(), zero_bin,
                                           bits, ks[l]))
        self._fit: Dict[Any, float] = {}

    def start(self):
        L = len(self.names)
        return ((0,) * L, (0,) * L if self.per_layer else 0)

    def last(self):
        L = len(self.names)
        nb, ns = len(self.bits) - 1, len(self.levels) - 1
        return ((nb,) * L, (ns,) * L if self.per_layer else ns)

    def k(self, key) -> List[int]:
        _, s = key
        if self.per_layer:
            return [c[i] for c, i in zip(self.layer_counts, s)]
        return self.counts[s]

    def fit(self, key) -> float:
        if key not in self._fit:
            b = key[0]
            self._fit[key] = float(sum(t.term(k, self.bits[i]) for t, k, i in zip(self.tables, self.k(key), b)))
        return self._fit[key]

    def variant(self, l: int, k: int, bits: int) -> Variant:
        return Variant("unstructured", k / self.tables[l].n, bits)

    def cost(self, key) -> float:
        total = 0.0
        for l, (k, i) in enumerate(zip(self.k(key), key[0])):
            ck = (self.names[l], k, self.bits[i])
            if ck not in self.cost_cache:
                self.cost_cache[ck] = float(self.cost_model(self.geoms[self.names[l]], self.variant(l, k, self.bits[i])))
            total += self.cost_cache[ck]
        return total

    def successors(self, key):
        b, s = key
        nb, ns = len(self.bits), len(self.levels)
        for l in range(len(b)):
            if b[l] + 1 < nb:
                yield (b[:l] + (b[l] + 1,) + b[l + 1:], s)
        if self.per_layer:
            for l in range(len(s)):
                if s[l] + 1 < ns:
                    yield (b, s[:l] + (s[l] + 1,) + s[l + 1:])
        elif s + 1 < ns:
            yield (b, s + 1)

    def step(self, key, g: float, dense: float, fit: Optional[float] = None, cost: Optional[float] = None) -> PathStep:
        b, s = key
        ks = self.k(key)
        fit = self.fit(key) if fit is None else fit
        cost = self.cost(key) if cost is None else cost
        return PathStep(
            bits={nm: self.bits[i] for nm, i in zip(self.names, b)},
            sparsity={nm: self.levels[i] for nm, i in zip(self.names, s)} if self.per_layer else self.levels[s],
            choice={nm: self.variant(l, k, self.bits[i]) for l, (nm, k, i) in enumerate(zip(self.names, ks, b))},
            fit=fit, cost=cost, fraction=cost / dense, g=g)


def plan_path(
    fisher: Fisher,
    model_or_weights: Any,
    geoms: Optional[Mapping[str, LayerGeometry]],
    goal: Union[Goal, str],
    *,
    bits: Sequence[int] = DEFAULT_BITS,
    sparsity: Sequence[float] = DEFAULT_SPARSITY,
    per_layer_sparsity: bool = False,
    lam: float = 1.0,
    mode: str = "astar",
    beam_width: int = 1,
    refresh: Optional[Callable[[PathStep], Fisher]] = None,
    zero_bin: bool = True,
    max_expansions: int = 20_000,
) -> FitPath:
    """Search per-layer bits and FIT-importance sparsity for ``goal`` (a ``Goal`` or "size=1/12",
    "bops=1/8"; see the module docstring for the state space, g, h and exactness).

    ``geoms``: the searched layers' geometries (None: the Fisher's, all its layers). A* on many
    layers can expand a great many states: past ``max_expansions`` it stops with an error; beam
    mode expands at most ``beam_width`` states per step.
    """
    t0 = time.perf_counter()
    fisher = _check_fisher(fisher)
    goal = parse_goal(goal) if isinstance(goal, str) else goal
    if not isinstance(goal, Goal):
        raise ValueError(f"goal must be a Goal or a string like 'size=1/12', got {type(goal).__name__}")
    bits = _bits_schedule(bits)
    levels = _sparsity_schedule(sparsity)
    if mode not in ("astar", "beam"):
        raise ValueError(f"mode must be 'astar' or 'beam', got {mode!r}")
    beam_width = _int_arg("beam_width", beam_width, 1)
    max_expansions = _int_arg("max_expansions", max_expansions, 1)
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not (0 <= lam < math.inf):
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
    if refresh is not None and not callable(refresh):
        raise ValueError(f"refresh must be callable (step -> Fisher) or None, got {type(refresh).__name__}")
    geoms = dict(fisher.geometries if geoms is None else geoms)
    if not geoms:
        raise ValueError("no layer to search: geoms is empty")
    for nm, g in geoms.items():
        if not isinstance(g, LayerGeometry):
            raise ValueError(f"geoms[{nm!r}] must be a LayerGeometry, got {type(g).__name__}")
        if nm not in fisher.diag:
            raise ValueError(f"layer {nm!r} has no Fisher (the Fisher holds {fisher.names[:5]}...)")
        if g.weights != fisher.diag[nm].numel():
            raise ValueError(f"layer {nm!r}: its geometry has {g.weights} weights, the Fisher {fisher.diag[nm].numel()}")
    names = list(geoms)
    W = _weights(fisher, model_or_weights, names)
    cost_cache: Dict = {}

    def make_space(f: Fisher) -> _Space:
        return _Space(f, W, names, geoms, bits, levels, per_layer_sparsity, goal.cost, zero_bin, cost_cache)

    space = make_space(fisher)
    dense = float(sum(goal.cost.dense(geoms[nm]) for nm in names))
    budget = goal.fraction * dense
    least = space.cost(space.last())
    if least > budget * (1 + 1e-12):
        raise ValueError(f"goal {goal} cannot be reached with these schedules: the least achievable {goal.cost.name} "
                         f"(every layer at {bits[-1]} bits, sparsity {levels[-1]:.4g}) is {least / dense:.4g} of dense "
                         f"({dense / least:.3g}x reduction)")

    def fresh(key) -> _Space:
        if refresh is None:
            return space
        f = _check_fisher(refresh(step_of(key)))
        for nm in names:
            if nm not in f.diag or f.diag[nm].shape != fisher.diag[nm].shape:
                raise ValueError(f"refresh returned a Fisher without layer {nm!r} of the weight's shape")
        return make_space(f)

    def h(fit: float, cost: float) -> float:
        return fit * max(0.0, cost - budget) / dense

    def meets(cost: float) -> bool:
        return cost <= budget * (1 + 1e-12)

    start = space.start()
    # node -> (g, parent, fit, cost, the space that generated it): FIT and counts stay those of the
    # Fisher the node was generated under, so that a refreshed Fisher cannot rewrite a path taken.
    nodes: Dict[Any, Tuple[float, Any, float, float, _Space]] = {
        start: (0.0, None, space.fit(start), space.cost(start), space)}
    expansions = 0
    counter = 0

    def step_of(key) -> PathStep:
        g, _, fit, cost, sp = nodes[key]
        return sp.step(key, g, dense, fit, cost)

    def expand(key, sp: _Space):
        g0 = nodes[key][0]
        f0 = sp.fit(key)
        for nxt in sp.successors(key):
            f1 = sp.fit(nxt)
            yield nxt, g0 + abs(f1 - f0), f1, sp.cost(nxt)

    def budget_error():
        return ValueError(f"the search expanded {max_expansions} states without reaching {goal}: use mode='beam', "
                          "a larger lam, or a larger max_expansions")

    found = None
    if mode == "astar":
        heap = [(lam * h(nodes[start][2], nodes[start][3]), counter, start)]
        closed = set()
        while heap:
            _, _, key = heapq.heappop(heap)
            if key in closed:
                continue
            if meets(nodes[key][3]):
                found = key
                break
            closed.add(key)
            if expansions >= max_expansions:
                raise budget_error()
            expansions += 1
            sp = fresh(key)
            for nxt, g1, f1, c1 in expand(key, sp):
                if nxt in closed or (nxt in nodes and nodes[nxt][0] <= g1):
                    continue
                nodes[nxt] = (g1, key, f1, c1, sp)
                counter += 1
                heapq.heappush(heap, (g1 + lam * h(f1, c1), counter, nxt))
    else:
        beam = [start]
        while True:
            goals = [k for k in beam if meets(nodes[k][3])]
            if goals:
                found = min(goals, key=lambda k: (nodes[k][0], nodes[k][2]))
                break
            cand: Dict[Any, Tuple[float, float, Any, float, float, _Space]] = {}
            for key in beam:
                if expansions >= max_expansions:
                    raise budget_error()
                expansions += 1
                sp = fresh(key)
                for nxt, g1, f1, c1 in expand(key, sp):
                    if nxt not in cand or g1 < cand[nxt][1]:
                        cand[nxt] = (g1 + lam * h(f1, c1), g1, key, f1, c1, sp)
            if not cand:  # cannot happen: the last state meets the goal (checked above)
                raise ValueError(f"the search ran out of moves before reaching {goal}")
            ranked = sorted(cand, key=lambda k: (cand[k][0], cand[k][1]))[:beam_width]
            for nxt in ranked:
                _, g1, parent, f1, c1, sp = cand[nxt]
                nodes[nxt] = (g1, parent, f1, c1, sp)
            beam = ranked
    if found is None:  # A* exhausted the lattice: only if the last state were infeasible
        raise ValueError(f"no state of the schedules meets {goal}")

    path: List[PathStep] = []
    key = found
    while key is not None:
        path.append(step_of(key))
        key = nodes[key][1]
    path.reverse()
    end = path[-1]
    return FitPath(choice=dict(end.choice), path=path, fit=end.fit, g=end.g, cost=end.cost, dense_cost=dense,
                   goal=goal, mode=mode, lam=float(lam), expansions=expansions, seconds=time.perf_counter() - t0,
                   info={"bits": list(bits), "sparsity": [float(s) for s in levels],
                         "per_layer_sparsity": per_layer_sparsity, "beam_width": beam_width if mode == "beam" else None,
                         "zero_bin": zero_bin, "refreshed": refresh is not None, "budget": budget})


# ---------------------------------------------------------------------------------------------
# applying a configuration


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


def apply_rtn_fit(
    model: nn.Module,
    choice: Mapping[str, Union[Variant, str]],
    fisher: Fisher,
) -> Tuple[Dict[str, torch.Tensor], Dict[str, Optional[QuantGrid]]]:
    """Compress ``model`` in place as FITCompress does before fine-tuning: each layer's FIT-importance
    mask at its sparsity (as ``fit_noise`` ranks it), then round to nearest on the per-channel
    symmetric min-max grid of its dense weights (the grid FIT's noise is measured on). Returns
    (masks, grids) per compressed layer: True = kept, in the weight's shape; grids on (groups x
    rows, cols), None for float layers; what ``finetune`` takes."""
    fisher = _check_fisher(fisher)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(choice, Mapping) or not choice:
        raise ValueError("choice must be a non-empty {layer: Variant} mapping")
    variants = {nm: _as_variant(nm, v) for nm, v in choice.items()}
    variants = {nm: v for nm, v in variants.items() if v != Variant()}
    found = _layer_geoms(model, variants)
    W = _weights(fisher, model, list(variants))
    masks = fit_masks(fisher, W, {nm: v.sparsity for nm, v in variants.items()})
    grids: Dict[str, Optional[QuantGrid]] = {}
    for nm, v in variants.items():
        li, geom = found[nm]
        w = li.module.weight
        rows = _rows(geom, W[nm]).to(torch.float32)
        keep = _rows(geom, masks[nm])
        grid = None if v.bits is None else QuantGrid.fit(rows, v.bits, symmetric=True, strategy="channel")
        new = (grid.quantize(rows) if grid is not None else rows) * keep
        with torch.no_grad():
            w.copy_(_unrows(geom, new, w.shape).to(w.dtype))
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
    epochs = _int_arg("epochs", epochs, 0)
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
                grid._check_shape(_rows(geom, w.detach()))
            except ValueError as e:
                raise ValueError(f"layer {nm!r}: {e}") from None
        layers.append((param_name[id(w)], w, geom, _rows(geom, keep.bool()).to(w.device),
                       None if grid is None else grid.to(w.device)))
    batches = [_split_batch(b) for b in (data if isinstance(data, (list, tuple)) else list(data))] if epochs else []
    if epochs and not batches:
        raise ValueError("the fine-tuning data is empty")

    def compressed(w, geom, keep, grid, ste: bool):
        rows = _rows(geom, w)
        q = rows.detach() if grid is None else grid.quantize(rows.detach().float()).to(rows.dtype)
        # Straight through: the forward sees the grid point, the gradient reaches the latent weight.
        out = (rows + (q - rows).detach()) if ste else q
        return _unrows(geom, out * keep, w.shape)

    from torch.func import functional_call

    saved_state = _ModelState(model)
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
                loss = _check_loss(loss_fn(out, y))
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
