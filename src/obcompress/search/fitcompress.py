"""FITCompress end to end: Fisher from calibration data, path planning to a goal, and the two ways
of applying the configuration found.

Fisher: the reference's estimate, ``batches * g^2`` per batch over 100 batches (one pass at most
over a shorter calibration set), and again over 20 at each expanded node (its approximate mode).
``cached_fisher`` keeps one on disk, keyed by the weights, data and settings it was estimated on:
``obcompress search fit --db DIR`` and ``search select --score fit`` share ``DIR/fisher.safetensors``.

Labels: the Fisher needs a loss on labelled data. ``labelled_batches`` takes (x, y) batches as they
are; for unlabelled calibration inputs of a classifier it labels each input with the dense
model's own top-1 prediction (cross-entropy against the model's own decisions: the loss whose
increase is the loss of agreement with the dense model), and refuses models whose output is not
(batch, classes) logits.

Applying a configuration: ``"rtn"`` is the paper's (a): the path's mask, round to nearest on the
reference's per-tensor grid (``apply_path_rtn``; the telescoping planner's configurations: FIT
masks and per-channel grids, ``apply_rtn_fit``), optionally fine-tuned with masks frozen and
straight-through quantization; ``"obc"`` is ours (b): the per-layer (sparsity, bits) handed to
``compress`` as a recipe, solved by the exact OBC solvers, post-training.
"""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..files import write_json
from ..model.calibration import calibration_batches, run_model, take_samples
from ..model.layers import find_layers
from .database import calibration_hash, weight_hash
from .fisher import Fisher, check_fisher, empirical_fisher, load_fisher, save_fisher
from .fit_apply import apply_path_rtn, apply_rtn_fit, finetune
from .fit_path import FISHER_BATCHES, REFRESH_BATCHES, FitPath, plan_path
from .fit_telescoping import plan_telescoping_path
from .nonuniform import Goal, parse_goal
from .sweep import attach_recipe_activations

__all__ = ["cached_fisher", "estimate_fisher", "labelled_batches", "run_fitcompress", "path_plot", "write_path_report"]

FISHER_FILE = "fisher.safetensors"


def _is_labelled(batch: Any) -> bool:
    return (isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], torch.Tensor)
            and not batch[1].is_floating_point() and batch[1].dim() >= 1)


def labelled_batches(model: nn.Module, data: Iterable, num_samples: int, transform_fn=None) -> List[Tuple[Any, Any]]:
    """(x, y) batches: the data's own labels when its batches are (x, y) pairs with integer labels
    (one per sample, or more, e.g. the next token of every position of a text window), else the
    dense model's top-1 prediction for each input. The data is read only as far as
    ``num_samples`` needs (a map-style Dataset is batched first, as for calibration)."""
    if isinstance(data, torch.utils.data.Dataset):
        data = torch.utils.data.DataLoader(data, batch_size=min(num_samples, 32))
    iterator = iter(data)
    first = next(iterator, None)
    if first is None:
        raise ValueError("calibration data is empty: the dataset yielded no samples")
    raw = itertools.chain([first], iterator)
    if _is_labelled(first):
        out, n = [], 0
        for x, y in raw:
            take = min(len(y), num_samples - n)
            if take < len(y):
                x, y = take_samples(x, take, len(y)), y[:take]
            out.append((x, y))
            n += take
            if n >= num_samples:
                break
        return out
    batches = calibration_batches(raw, num_samples, transform_fn)
    out = []
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for b in batches:
                logits = run_model(model, b)
                if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[1] < 2:
                    shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
                    raise ValueError(
                        f"the Fisher needs labelled data: the calibration batches have no labels and the model's "
                        f"output ({shape}) is not (batch, classes) logits to label them with; give (x, y) batches")
                out.append((b, logits.argmax(dim=1)))
    finally:
        model.train(was)
    return out


def _cross_entropy(output, y):
    return F.cross_entropy(output, y)


cross_entropy = _cross_entropy


def estimate_fisher(model: nn.Module, labelled: Sequence[Tuple[Any, Any]], *, loss_fn: Callable = _cross_entropy,
                    targets: Union[None, str, Sequence[str]] = None, batches: int = FISHER_BATCHES,
                    mode: str = "batch") -> Fisher:
    """The reference's Fisher estimate: ``batches`` batches of labelled data (100 there; one pass at
    most over a shorter calibration set, since cycling it adds no information)."""
    n = max(2, int(batches))
    return empirical_fisher(model, labelled, loss_fn, layers=targets, mode=mode, min_batches=n, max_batches=n,
                            cycle=False)


def _fisher_key(model: nn.Module, names: Sequence[str], labelled, settings: Dict[str, Any]) -> Dict[str, Any]:
    found = find_layers(model, list(names), ())
    return {"weights": {n: weight_hash(found[n]) for n in names}, "data": calibration_hash(labelled),
            "settings": settings}


def cached_fisher(path: Union[str, os.PathLike], model: nn.Module, labelled: Sequence[Tuple[Any, Any]], *,
                  loss_fn: Callable = _cross_entropy, targets: Union[None, str, Sequence[str]] = None,
                  batches: int = FISHER_BATCHES, mode: str = "batch") -> Tuple[Fisher, bool]:
    """(the Fisher, whether it came from ``path``): the one saved at ``path`` when it was estimated
    on these very weights and labelled data with these settings, else a new estimate
    (``estimate_fisher``), saved there. ``search fit --db DIR`` and ``search select --score fit``
    share it through ``DIR/fisher.safetensors``."""
    path = Path(path)
    settings = {"batches": int(batches), "mode": mode, "loss": getattr(loss_fn, "__name__", "loss")}
    if path.exists():
        try:
            fisher, key = load_fisher(path)
        except ValueError:
            fisher, key = None, {}
        if fisher is not None and key == _fisher_key(model, fisher.names, labelled, settings):
            return fisher, True
    fisher = estimate_fisher(model, labelled, loss_fn=loss_fn, targets=targets, batches=batches, mode=mode)
    save_fisher(fisher, path, _fisher_key(model, fisher.names, labelled, settings))
    return fisher, False


def run_fitcompress(model: nn.Module, data: Iterable, goal: Union[str, Goal], *,
                    evaluate: Optional[Callable[[nn.Module], Dict[str, float]]] = None,
                    apply: Sequence[str] = ("obc",), num_calibration_samples: int = 256,
                    loss_fn: Callable = _cross_entropy, planner: str = "fitcompress", mode: str = "beam",
                    beam_width: int = 1, lam: float = 1.0, fisher_mode: str = "batch",
                    fisher_batches: int = FISHER_BATCHES, refresh_batches: int = REFRESH_BATCHES,
                    finetune_epochs: int = 0, finetune_lr: float = 1e-4, progress: bool = True,
                    activation_bits: Optional[int] = None, targets: Union[None, str, Sequence[str]] = None,
                    fisher: Optional[Fisher] = None, max_expansions: Optional[int] = None) -> Dict[str, Any]:
    """Fisher, path, and each requested application evaluated on a fresh copy of ``model``.

    ``planner``: ``"fitcompress"`` (``plan_path``, FITCompress as defined) or ``"telescoping"``
    (``plan_telescoping_path``, the variant). ``refresh_batches`` > 0: the reference's approximate
    mode, the Fisher re-estimated at every expanded node from that many batches (one pass at most)
    on a copy of the model holding the node's weights (the telescoping planner: the node's
    configuration applied by ``apply_rtn_fit``); 0: one Fisher for the whole path.
    ``fisher_batches``: the first Fisher's batches (100, one pass at most).

    Returns {"path": FitPath, "fisher", "fisher_seconds", "search_seconds", "results": {apply:
    {metrics, seconds}}}. At a BOPs goal with ``activation_bits`` both applications run with the
    recipe's input quantizers, as the cost counts them. ``targets``: the layers to consider, as ``find_layers`` reads them (None:
    every compressible layer; each must take part in the loss). ``fisher``: one estimated before on
    this model and data, reused instead of a new estimate (several goals, one Fisher); its layers
    are the ones considered. ``model`` is left dense.
    """
    import copy

    from ..api import compress

    goal = goal if isinstance(goal, Goal) else parse_goal(goal, **({"activation_bits": activation_bits}
                                                                    if goal.startswith("bops") and activation_bits else {}))
    bad = [a for a in apply if a not in ("obc", "rtn")]
    if bad:
        raise ValueError(f"apply must be obc and/or rtn, got {bad}")
    if planner not in ("fitcompress", "telescoping"):
        raise ValueError(f"planner must be 'fitcompress' (FITCompress as defined) or 'telescoping' (the variant), "
                         f"got {planner!r}")
    if isinstance(refresh_batches, bool) or not isinstance(refresh_batches, int) or refresh_batches < 0:
        raise ValueError(f"refresh_batches must be an integer >= 0, got {refresh_batches!r}")
    t0 = time.perf_counter()
    labelled = labelled_batches(model, data, num_calibration_samples)
    if fisher is None:
        fisher = estimate_fisher(model, labelled, loss_fn=loss_fn, targets=targets, batches=fisher_batches,
                                 mode=fisher_mode)
    else:
        fisher = check_fisher(fisher)
    names = list(fisher.diag)
    t1 = time.perf_counter()
    n_refresh = max(2, refresh_batches)
    work = copy.deepcopy(model) if refresh_batches > 0 else None

    def refresh_at(weights: Dict[str, torch.Tensor]) -> Fisher:
        found = find_layers(work, names, ())
        with torch.no_grad():
            for nm, w in weights.items():
                found[nm].module.weight.copy_(w.to(found[nm].module.weight.dtype))
        return empirical_fisher(work, labelled, loss_fn, layers=names, mode=fisher_mode, min_batches=n_refresh,
                                max_batches=n_refresh, cycle=False)

    def refresh_step(step) -> Fisher:
        m = copy.deepcopy(model)
        apply_rtn_fit(m, step.choice, fisher)
        return empirical_fisher(m, labelled, loss_fn, layers=names, mode=fisher_mode, min_batches=n_refresh,
                                max_batches=n_refresh, cycle=False)

    limits = {} if max_expansions is None else {"max_expansions": max_expansions}
    if planner == "fitcompress":
        path = plan_path(fisher, model, None, goal, lam=lam, mode=mode, beam_width=beam_width,
                         refresh=refresh_at if refresh_batches > 0 else None, progress=progress, **limits)
    else:
        path = plan_telescoping_path(fisher, model, None, goal, lam=lam, mode=mode, beam_width=beam_width,
                                     refresh=refresh_step if refresh_batches > 0 else None, **limits)
    t2 = time.perf_counter()
    out: Dict[str, Any] = {"path": path, "fisher": fisher, "fisher_seconds": t1 - t0, "search_seconds": t2 - t1,
                           "fisher_batches": fisher.batches, "fisher_converged": fisher.converged, "results": {}}
    for how in apply:
        m = copy.deepcopy(model)
        t = time.perf_counter()
        if how == "obc":
            compress(m, path.recipe(activation_bits=activation_bits if goal.cost.name == "bops" else None),
                     labelled_inputs(labelled), num_calibration_samples=num_calibration_samples, progress=progress)
        else:
            masks, grids = apply_path_rtn(m, path) if path.weights is not None else apply_rtn_fit(m, path.choice, fisher)
            if finetune_epochs > 0:
                finetune(m, labelled, loss_fn, masks, grids, epochs=finetune_epochs, lr=finetune_lr)
            if goal.cost.name == "bops" and activation_bits:
                # Evaluated as costed: the recipe's input quantizers, as (b) gets them from compress.
                attach_recipe_activations(m, path.recipe(activation_bits=activation_bits), labelled_inputs(labelled))
        seconds = time.perf_counter() - t
        out["results"][how] = {"metrics": evaluate(m) if evaluate else None, "seconds": seconds}
    return out


def labelled_inputs(labelled: List[Tuple[Any, Any]]) -> List[Any]:
    return [x for x, _ in labelled]


def path_plot(path: FitPath, png: Union[str, os.PathLike], *, title: Optional[str] = None) -> Path:
    """FIT against the compression reached at each step of the path (PNG, written atomically)."""
    from .plots import _matplotlib, _save

    mpl = _matplotlib()
    fig_cls, canvas_cls = mpl
    fig = fig_cls(figsize=(6.4, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    xs = [1.0 / s.fraction if s.fraction > 0 else float("inf") for s in path.path]
    ys = [s.fit for s in path.path]
    ax.plot(xs, ys, marker="o", markersize=3)
    ax.axvline(path.goal.reduction, linestyle="--", color="grey", label=f"goal {path.goal.reduction:g}x")
    ax.set_xlabel(f"{path.goal.cost.name} reduction (x)")
    ax.set_ylabel("FIT")
    if all(y > 0 for y in ys):
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(title or f"FIT path ({path.mode}), {len(path.path) - 1} steps")
    return _save(fig, canvas_cls, Path(png), 120)


def write_path_report(path: FitPath, directory: Union[str, os.PathLike], extra: Optional[Dict[str, Any]] = None) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    doc = {**path.to_dict(), **(extra or {})}
    write_json(d / "fit_path.json", doc, indent=1)
    path_plot(path, d / "fit_path.png")
    return d
