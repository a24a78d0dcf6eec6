"""FITCompress end to end: Fisher from calibration data, path planning to a goal, and the two ways
of applying the configuration found.

Labels: the Fisher needs a loss on labelled data. ``labelled_batches`` takes (x, y) batches as they
are; for unlabelled calibration inputs of a classifier it labels each input with the dense
model's own top-1 prediction (cross-entropy against the model's own decisions: the loss whose
increase is the loss of agreement with the dense model), and refuses models whose output is not
(batch, classes) logits.

Applying a configuration: ``"rtn"`` is the paper's (a): round-to-nearest grids with the
FIT-importance mask, optionally fine-tuned with masks frozen and straight-through quantization;
``"obc"`` is ours (b): the per-layer (sparsity, bits) handed to ``compress`` as a recipe, solved by
the exact OBC solvers, post-training.
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
from .fit import Fisher, FitPath, _check_fisher, apply_rtn_fit, empirical_fisher, finetune, plan_path
from .nonuniform import Goal, parse_goal

__all__ = ["labelled_batches", "run_fitcompress", "path_plot"]


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


def run_fitcompress(model: nn.Module, data: Iterable, goal: Union[str, Goal], *,
                    evaluate: Optional[Callable[[nn.Module], Dict[str, float]]] = None,
                    apply: Sequence[str] = ("obc",), num_calibration_samples: int = 256,
                    loss_fn: Callable = _cross_entropy, mode: str = "beam", beam_width: int = 1, lam: float = 1.0,
                    fisher_mode: str = "batch", min_batches: int = 4, max_batches: int = 64, tol: float = 0.05,
                    finetune_epochs: int = 0, finetune_lr: float = 1e-4, progress: bool = True,
                    activation_bits: Optional[int] = None, refresh_batches: int = 0,
                    targets: Union[None, str, Sequence[str]] = None, fisher: Optional[Fisher] = None) -> Dict[str, Any]:
    """Fisher, path, and each requested application evaluated on a fresh copy of ``model``.

    ``refresh_batches`` > 0: the reference's approximate mode, the Fisher re-estimated at every
    expanded node from that many batches, on a copy of the model compressed (RTN + FIT mask) to
    the node's configuration.

    Returns {"path": FitPath, "fisher_seconds", "search_seconds", "results": {apply: {metrics, seconds}}}.
    ``targets``: the layers to consider, as ``find_layers`` reads them (None: every compressible
    layer; each must take part in the loss). ``fisher``: one estimated before on this model and data
    (``empirical_fisher``), reused instead of a new estimate (several goals, one Fisher); its layers
    are the ones considered. ``model`` is left dense.
    """
    import copy

    from ..api import compress

    goal = goal if isinstance(goal, Goal) else parse_goal(goal, **({"activation_bits": activation_bits}
                                                                    if goal.startswith("bops") and activation_bits else {}))
    bad = [a for a in apply if a not in ("obc", "rtn")]
    if bad:
        raise ValueError(f"apply must be obc and/or rtn, got {bad}")
    t0 = time.perf_counter()
    labelled = labelled_batches(model, data, num_calibration_samples)
    if fisher is None:
        fisher = empirical_fisher(model, labelled, loss_fn, layers=targets, mode=fisher_mode,
                                  min_batches=min_batches, max_batches=max_batches, tol=tol)
    else:
        fisher = _check_fisher(fisher)
        targets = list(fisher.diag)
    t1 = time.perf_counter()

    def refresh(step):
        m = copy.deepcopy(model)
        apply_rtn_fit(m, step.choice, fisher)
        # The convergence test needs two batches at least.
        n = max(2, refresh_batches)
        return empirical_fisher(m, labelled, loss_fn, layers=targets, mode=fisher_mode, min_batches=n,
                                max_batches=n, tol=tol)

    path = plan_path(fisher, model, None, goal, lam=lam, mode=mode, beam_width=beam_width,
                     refresh=refresh if refresh_batches > 0 else None)
    t2 = time.perf_counter()
    out: Dict[str, Any] = {"path": path, "fisher_seconds": t1 - t0, "search_seconds": t2 - t1,
                           "fisher_batches": fisher.batches, "fisher_converged": fisher.converged, "results": {}}
    for how in apply:
        m = copy.deepcopy(model)
        t = time.perf_counter()
        if how == "obc":
            compress(m, path.recipe(activation_bits=activation_bits if goal.cost.name == "bops" else None),
                     labelled_inputs(labelled), num_calibration_samples=num_calibration_samples, progress=progress)
        else:
            masks, grids = apply_rtn_fit(m, path.choice, fisher)
            if finetune_epochs > 0:
                finetune(m, labelled, loss_fn, masks, grids, epochs=finetune_epochs, lr=finetune_lr)
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
