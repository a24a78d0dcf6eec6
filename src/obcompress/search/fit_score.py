"""What FIT measures: the Fisher-weighted size of a perturbation of the weights, predicted or measured.

Measured (``fit_perturbation``): for weights theta and their compressed form theta',
``sum_i F_ii (theta_i - theta'_i)^2`` with F the empirical Fisher's diagonal (a pruned weight counts
``theta_i^2``). Near a minimum of the loss the loss grows by about half of it, since the empirical
Fisher approximates the Hessian there.

Predicted (``fit_noise``, FIT's noise model): a layer at b bits rounds its weights on a uniform grid
of step Delta, and rounding adds noise of mean square ``Delta^2 / 12`` to each kept weight; a
pruned weight moves by ``theta_i``. So

    FIT = sum_l [ sum_{i pruned} F_ii theta_i^2 + sum_{i kept} F_ii Delta_l^2 / 12 ]

the per-weight form of ``sum_l Tr(F_l) Delta_l^2 / 12``. The step is the paper's and the FIT
reference code's (``noise_model``): the tensor's range over the levels, ``Delta_l = (max theta_l -
min theta_l) / (2^b - 1)`` (the reference leaves out the constant 1/12, which matters only beside
the pruned term). ``delta="channel"``: one step per output channel instead, the per-row symmetric
min-max grid ``QuantGrid.fit`` gives (``2 max|row| / (2^b - 1)``); ``zero_bin=True``: a weight with
``|theta| < Delta / 2`` rounds to the grid's zero, so it counts ``theta^2`` instead of
``Delta^2 / 12``. Those two are the telescoping planner's model (``fit_telescoping``), not FIT's. A
float layer (no bits) has no rounding noise. The masks are FIT importance masks: the weights of
least ``F_ii theta_i^2`` are pruned (``fit_masks``).

Measured on the OBC database (``fit_scores``): for every layer and variant of a database, the first
sum on the weights the exact solvers actually produced, ``sum_i F_ii (theta_i - theta_hat_i)^2``,
stored as a database score that the DP and SPDY can sum instead of the layer-wise error.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import sys
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from ..model.layers import find_layers, weight_groups
from ..solvers import QuantGrid, num_pruned
from .database import Database
from .fisher import Fisher, check_fisher
from .space import Variant

__all__ = ["fit_masks", "fit_noise", "fit_perturbation", "fit_scores", "fit_score_kind", "is_fit_score"]


def layer_weights(fisher: Fisher, source: Any, names: Sequence[str], what: str = "weights") -> Dict[str, torch.Tensor]:
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


def importance(fisher: Fisher, nm: str, W: torch.Tensor) -> torch.Tensor:
    """F_ii theta_i^2, flattened in the (groups x rows, cols) layout (float64)."""
    geom = fisher.geometries[nm]
    return (geom.as_rows(fisher.diag[nm]).double() * geom.as_rows(W).double() ** 2).flatten()


def check_level(what: str, s: Any) -> float:
    if isinstance(s, bool) or not isinstance(s, numbers.Real) or not 0 <= s < 1 or math.isnan(s):
        raise ValueError(f"{what} must be a number in [0, 1), got {s!r}")
    return float(s)


def global_counts(imps: Sequence[torch.Tensor], levels: Sequence[float], cap: Optional[float]) -> List[List[int]]:
    """Per level, each layer's number of weights among the ``num_pruned(level, N)`` globally least
    important (ties in layer order, then position), each capped at ``num_pruned(cap, n_l)`` and
    ``n_l - 1`` when ``cap`` is given."""
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
    fisher = check_fisher(fisher)
    per_layer = isinstance(sparsity, Mapping)
    names = list(sparsity) if per_layer else fisher.names
    W = layer_weights(fisher, weights, names)
    imps = [importance(fisher, nm, W[nm]) for nm in names]
    if per_layer:
        counts = [num_pruned(check_level(f"layer {nm!r} sparsity", sparsity[nm]), imp.numel())
                  for nm, imp in zip(names, imps)]
    else:
        s = check_level("sparsity", sparsity)
        cap = None if max_layer_sparsity is None else check_level("max_layer_sparsity", max_layer_sparsity)
        counts = global_counts(imps, [s], cap)[0]
    out = {}
    for nm, imp, k in zip(names, imps, counts):
        keep = torch.ones(imp.numel(), dtype=torch.bool)
        keep[torch.argsort(imp, stable=True)[:k]] = False
        geom = fisher.geometries[nm]
        out[nm] = geom.from_rows(keep.reshape(geom.groups * geom.rows, geom.cols), W[nm].shape)
    return out


def as_unstructured(name: str, v: Any) -> Variant:
    v = v if isinstance(v, Variant) else Variant.from_key(v)
    if v.pruned and v.kind != "unstructured":
        raise ValueError(f"layer {name!r}: variant {v.key}: FIT masks are unstructured (by F_ii theta_i^2), "
                         f"not {v.structure}")
    return v


def noise_steps(W_rows: torch.Tensor, bits: int, delta: str) -> torch.Tensor:
    """The rounding step of each row (rows, 1): the tensor's range over 2^b - 1 (``"range"``) or the
    row's symmetric min-max grid (``"channel"``)."""
    if delta == "range":
        step = (W_rows.max() - W_rows.min()).double() / (2 ** bits - 1)
        return step.expand(W_rows.shape[0], 1)
    return QuantGrid.fit(W_rows.to(torch.float32), bits, symmetric=True, strategy="channel").scale.double()


def rounding_noise(F: torch.Tensor, W: torch.Tensor, step: torch.Tensor, zero_bin: bool) -> torch.Tensor:
    """Per-weight F * e(theta; Delta) on rows (float64), ``step`` (rows, 1)."""
    delta = step.double().expand_as(W)
    e = delta ** 2 / 12
    if zero_bin:
        e = torch.where(W.abs() < delta / 2, W ** 2, e)
    return F * e


def _check_delta(delta: Any) -> str:
    if delta not in ("range", "channel"):
        raise ValueError(f"delta must be 'range' (the tensor's range, FIT's) or 'channel', got {delta!r}")
    return delta


def fit_noise(
    fisher: Fisher,
    choice: Mapping[str, Union[Variant, str]],
    weights: Any,
    *,
    delta: str = "range",
    zero_bin: bool = False,
    masks: Optional[Mapping[str, torch.Tensor]] = None,
) -> float:
    """FIT of a configuration (module docstring): ``sum_l [sum_pruned F theta^2 + sum_kept F
    Delta_l^2 / 12]``. Each layer's mask prunes ``num_pruned(v.sparsity, n_l)`` of its weights of
    least ``F theta^2`` (the layer's share of a global mask, when the choice came from one), unless
    ``masks`` (True = kept) gives it. A layer of the Fisher not in ``choice`` is not counted."""
    fisher = check_fisher(fisher)
    delta = _check_delta(delta)
    if not isinstance(choice, Mapping) or not choice:
        raise ValueError("choice must be a non-empty {layer: Variant} mapping")
    variants = {nm: as_unstructured(nm, v) for nm, v in choice.items()}
    W = layer_weights(fisher, weights, list(variants))
    if masks is None:
        masks = fit_masks(fisher, W, {nm: v.sparsity for nm, v in variants.items()})
    total = 0.0
    for nm, v in variants.items():
        geom = fisher.geometries[nm]
        keep = masks.get(nm) if isinstance(masks, Mapping) else None
        if not isinstance(keep, torch.Tensor) or keep.shape != W[nm].shape:
            raise ValueError(f"layer {nm!r}: masks must give a bool tensor of the weight's shape {tuple(W[nm].shape)}")
        F = geom.as_rows(fisher.diag[nm]).double()
        Wr = geom.as_rows(W[nm]).double()
        kr = geom.as_rows(keep.bool())
        total += float((F * Wr ** 2)[~kr].sum())
        if v.bits is not None:
            total += float(rounding_noise(F, Wr, noise_steps(Wr, v.bits, delta), zero_bin)[kr].sum())
    return total


def fit_perturbation(fisher: Fisher, original_weights: Any, compressed_weights: Any) -> float:
    """``sum_i F_ii (theta_i - theta'_i)^2`` over the Fisher's layers (models or {layer: tensor})."""
    fisher = check_fisher(fisher)
    a = layer_weights(fisher, original_weights, fisher.names, "original weights")
    b = layer_weights(fisher, compressed_weights, fisher.names, "compressed weights")
    return float(sum((fisher.diag[nm].double() * (a[nm].double() - b[nm].double()) ** 2).sum() for nm in fisher.names))


# ---------------------------------------------------------------------------------------------
# FIT on the OBC database


# The database score names of FIT scores start with this (the rest is a digest of their Fisher).
FIT_SCORE_PREFIX = "fit_"


def is_fit_score(score: str) -> bool:
    """Whether the database score ``score`` holds FIT scores (``fit_score_kind``)."""
    return score.startswith(FIT_SCORE_PREFIX)


def fit_score_kind(fisher: Fisher) -> str:
    """The database score name of the FIT scores of one Fisher: ``fit_`` and a digest of its
    diagonals, so that scores of another estimate are never mixed in."""
    h = hashlib.sha256()
    for nm in check_fisher(fisher).names:
        t = fisher.diag[nm].detach().to("cpu", torch.float32).contiguous()
        h.update(nm.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return FIT_SCORE_PREFIX + h.hexdigest()[:16]


def fit_scores(db: Database, model: nn.Module, fisher: Fisher, *, prefix: str = "", progress: bool = True,
               save: bool = True) -> str:
    """Score every variant of every database layer by ``sum_i F_ii (theta_i - theta_hat_i)^2``, the
    Fisher-weighted size of the perturbation the exact solvers' weights theta_hat make (the dense
    variant scores 0), and store the scores in the database. Returns the score name to sum
    (``select_dp(db, goal, score=...)``, ``spdy(..., score=...)``).

    ``model``: the database's model, dense (its weights are the theta). ``prefix``: the Fisher names
    a database layer ``prefix + name`` (a Fisher estimated on a module around the model, as a
    ``FisherTask``'s). Layers already scored with this Fisher are not scored again, so an
    interrupted run resumes.
    """
    from tqdm.auto import tqdm

    fisher = check_fisher(fisher)
    kind = fit_score_kind(fisher)
    found = find_layers(model, db.names, ())
    todo = []
    for name in db.names:
        fname = prefix + name
        if fname not in fisher.diag:
            raise ValueError(f"layer {name}: the Fisher has no layer {fname!r} (it holds {fisher.names[:3]}...)")
        g = db.layers[name].geometry
        if fisher.diag[fname].numel() != g.weights:
            raise ValueError(f"layer {name}: the Fisher has {fisher.diag[fname].numel()} weights, the database "
                             f"{g.weights}")
        keys = list(db.layers[name].variants)
        if not (save and all(kind in db.layers[name].variants[k] for k in keys)):
            todo.append(name)
    bar = tqdm(todo, desc="fit scores", unit="layer", disable=not progress, file=sys.stderr)
    for name in bar:
        g = db.layers[name].geometry
        F = g.as_rows(fisher.diag[prefix + name]).double().reshape(g.groups, g.rows, g.cols)
        dense = weight_groups(found[name])
        scores = {}
        for key in db.layers[name].variants:
            W_hat = db.weights(name, key, dense)
            scores[key] = float((F * (dense.double() - W_hat.double()) ** 2).sum())
        if save:
            db.save_scores(kind, {name: scores})
        else:
            for key, val in scores.items():
                db.layers[name].variants[key][kind] = val
    bar.close()
    return kind
