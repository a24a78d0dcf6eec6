"""The empirical Fisher of a model's compressible layers: the sensitivity FIT and FITCompress read.

For every weight i of the compressible layers, ``F_ii = E_samples[(d loss_n / d theta_i)^2]`` with
``loss_n`` one sample's loss, estimated as a running mean over batches of one estimate per batch:

- ``mode="batch"`` (the FITCompress reference's estimate): ``B * g_i^2`` with ``g`` the gradient of
  the batch's *mean* loss over its B samples. Since ``E[g^2] = E[g_n^2] / B + (1 - 1/B) E[g_n]^2``,
  this is unbiased for the per-sample mean square where the expected per-sample gradient is zero (a
  trained model at a minimum of the calibration loss) and biased upwards by ``(B - 1) E[g_n]^2``
  elsewhere.
- ``mode="per_sample"``: the exact ``mean_n g_n,i^2`` over the batch, per-sample gradients by
  ``torch.func`` (``functional_call`` + ``vmap`` + ``grad``, chunked to bound memory), or one
  backward per sample where the model cannot be vmapped (recorded in ``info["per_sample"]``).

The per-layer trace is ``Tr(F_l) = sum_{i in l} F_ii``. After each batch b >= 2 the relative
standard error of each layer's mean trace, ``std(t_l) / sqrt(b) / mean(t_l)`` over the per-batch
traces ``t_l``, is taken and its maximum over layers recorded (``Fisher.history``); estimation stops
at the first batch >= ``min_batches`` where it is below ``tol`` (``converged``), or at
``max_batches``. Shorter data are cycled (``cycle=True``) or read once (``cycle=False``: at most one
pass, what FITCompress's batch counts mean on a calibration set smaller than them). The model is
evaluated in eval mode (dropout off, normalisation statistics frozen): the Fisher of the model that
will be deployed. Optional activation traces: ``Tr(F_x,l) = mean_n ||d loss_n / d x_l,n||^2`` over
the layer's input x; with no interaction between the samples of a batch (eval mode),
``d loss_n / d x_n`` is exactly B times the gradient of the mean loss, so this is exact in both modes.

A Fisher is saved and loaded as safetensors (``save_fisher`` / ``load_fisher``: the diagonals as
tensors, everything else and a caller's key as JSON metadata; nothing is pickled).
"""

from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from ..model.calibration import count_samples, run_model
from ..model.layers import find_layers
from .space import LayerGeometry

__all__ = ["Fisher", "empirical_fisher", "load_fisher", "save_fisher"]

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


def split_batch(batch: Any) -> Tuple[Any, Any]:
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
    so a generator can be cycled too); with ``repeat=False``, None once the data are exhausted."""

    def __init__(self, data: Any, repeat: bool = True):
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
        self.repeat = repeat

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
                if not self.repeat:
                    return None
                self.cycled = True
        if not self.repeat:
            return None
        batch = self._seen[self._pos % len(self._seen)]
        self._pos += 1
        return batch


def check_int(name: str, value: Any, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    return int(value)


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


def check_loss(loss: Any) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.is_floating_point():
        raise ValueError(f"loss_fn must return a scalar floating tensor (the batch's mean loss), got "
                         f"{type(loss).__name__}" + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else ""))
    if not loss.requires_grad:
        raise ValueError("the loss does not depend on the model's weights (no gradient): loss_fn must use the output")
    if not torch.isfinite(loss).all():
        raise ValueError(f"the loss is not finite ({float(loss.detach())}) on a calibration batch")
    return loss.reshape(())


class ModelState:
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
    cycle: bool = True,
) -> Fisher:
    """The diagonal empirical Fisher of ``model``'s compressible layers on labelled ``data``.

    ``data``: an iterable of ``(inputs, targets)`` batches (or dicts with ``labels``); inputs go to
    the model as ``run_model`` passes them. ``loss_fn(output, targets)`` is the batch's mean loss.
    ``layers``: targets as ``find_layers`` reads them (None: every compressible layer). The model
    is left as it was: training flags, ``requires_grad`` and ``.grad`` of every parameter.
    ``cycle=False``: one pass at most over data shorter than ``max_batches`` (then at least one
    batch, and ``min_batches`` does not apply).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if loss_fn is None or not callable(loss_fn):
        raise ValueError("the Fisher needs a loss: loss_fn(output, targets) -> the batch's mean loss")
    if mode not in ("batch", "per_sample"):
        raise ValueError(f"mode must be 'batch' or 'per_sample', got {mode!r}")
    min_batches = check_int("min_batches", min_batches, 2)
    max_batches = check_int("max_batches", max_batches, 2)
    if min_batches > max_batches:
        raise ValueError(f"min_batches ({min_batches}) exceeds max_batches ({max_batches})")
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not (0 < tol < math.inf):
        raise ValueError(f"tol must be a positive number, got {tol!r}")
    infos = find_layers(model, layers)
    names = list(infos)
    source = _Cycle(data, repeat=cycle)

    weights = [info.module.weight for info in infos.values()]
    param_name = {id(p): n for n, p in model.named_parameters()}
    missing = [n for n, w in zip(names, weights) if id(w) not in param_name]
    if missing:
        raise ValueError(f"layers {missing[:5]}: their weight is not a parameter of the model")
    wnames = [param_name[id(w)] for w in weights]

    saved_state = ModelState(model)
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
            batch = source.next()
            if batch is None:  # one pass over data shorter than max_batches
                break
            x, y = split_batch(batch)
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
        loss = check_loss(loss_fn(run_model(model, x), y))
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
        loss = check_loss(loss_fn(run_model(model, xi), yi))
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



def check_fisher(fisher: Any) -> Fisher:
    if not isinstance(fisher, Fisher):
        raise ValueError(f"fisher must be a Fisher (see empirical_fisher), got {type(fisher).__name__}")
    return fisher


# ---------------------------------------------------------------------------------------------
# on disk

FISHER_FORMAT = "obcompress-fisher"


def save_fisher(fisher: Fisher, path: Union[str, os.PathLike], key: Optional[Mapping[str, Any]] = None) -> Path:
    """Write ``fisher`` to ``path`` (safetensors, atomically). ``key``: JSON-able facts the reader
    checks before reusing it (which weights and data it was estimated on)."""
    from .database import _write_layer as write_safetensors

    fisher = check_fisher(fisher)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FISHER_FORMAT, "names": fisher.names, "traces": fisher.traces,
            "geometries": {n: g.to_dict() for n, g in fisher.geometries.items()}, "batches": fisher.batches,
            "samples": fisher.samples, "mode": fisher.mode, "tol": fisher.tol, "converged": fisher.converged,
            "history": fisher.history, "activation_traces": fisher.activation_traces, "info": fisher.info,
            "key": dict(key or {})}
    write_safetensors(path, {f"diag.{i}": fisher.diag[n].contiguous() for i, n in enumerate(fisher.names)}, meta)
    return path


def load_fisher(path: Union[str, os.PathLike]) -> Tuple[Fisher, Dict[str, Any]]:
    """(the Fisher, its key) from a file ``save_fisher`` wrote."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("obcompress") or "null")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"{path}: not a readable Fisher file ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FISHER_FORMAT:
        raise ValueError(f"{path}: not a Fisher written by obcompress")
    names = meta["names"]
    diag = {n: tensors[f"diag.{i}"] for i, n in enumerate(names)}
    fisher = Fisher(diag=diag, traces={n: float(meta["traces"][n]) for n in names},
                    geometries={n: LayerGeometry.from_dict(meta["geometries"][n]) for n in names},
                    batches=int(meta["batches"]), samples=int(meta["samples"]), mode=meta["mode"],
                    tol=float(meta["tol"]), converged=bool(meta["converged"]), history=list(meta["history"]),
                    activation_traces=meta["activation_traces"], info=dict(meta["info"]))
    return fisher, dict(meta["key"])
