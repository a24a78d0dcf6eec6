"""Accuracy against budget: uniform, DP and SPDY configurations of a database, evaluated.

``run_sweep`` stitches each method's configuration at each goal into the model (the database's
weights, identical to what ``compress`` produces from the configuration's recipe), evaluates it
with the model's own evaluation, as ``compress`` would run the configuration's recipe (its input
quantizers for BOPs goals, its correction), and writes ``sweep.json`` (plus each configuration's recipe)
into a directory that ``obcompress report`` turns into a Pareto plot and per-layer charts.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch.nn as nn
import yaml

from ..files import write_json, write_text
from ..model.activations import ActivationHooks, attach, calibrate_activation_quantizers
from ..model.calibration import calibration_batches
from ..model.corrections import correctable_norms, norm_statistics, reestimate_batchnorm, statistics_correction
from ..model.layers import find_layers
from .database import Database
from .nonuniform import Configuration, Goal, _Stitcher, best_uniform, parse_goal, select_dp, spdy

__all__ = ["METHODS", "RECIPE_CORRECTIONS", "as_recipe_runs", "attach_recipe_activations", "make_correction", "run_sweep", "main_metric", "write_sweep_plots", "SWEEP_FILE"]

METHODS = ("uniform", "dp", "spdy")
SWEEP_FILE = "sweep.json"
CORRECTIONS = ("none", "bn", "statcorr")
# What a correction is in a recipe, so that `compress` reproduces the model a sweep evaluated.
RECIPE_CORRECTIONS = {"bn": {"bn_reestimation": True}, "statcorr": {"statistics_correction": True}}


def main_metric(metrics: Mapping[str, float]) -> str:
    for k in ("top1", "accuracy"):
        if k in metrics:
            return k
    return next(iter(metrics))


def make_correction(kind: str, batches, model: Optional[nn.Module] = None) -> Optional[Callable[[nn.Module], None]]:
    """The correction run on a stitched model before it is scored. ``statcorr`` takes the norm
    layers' output statistics of ``model`` now, which must be the dense model."""
    if kind not in CORRECTIONS:
        raise ValueError(f"correction must be one of {CORRECTIONS}, got {kind!r}")
    if kind == "bn":
        return lambda m: reestimate_batchnorm(m, batches)
    if kind == "statcorr":
        if model is None:
            raise ValueError("statistics correction needs the dense model's statistics: pass the dense model")
        if not correctable_norms(model):
            raise ValueError("correction statcorr: the model has no BatchNorm, GroupNorm or LayerNorm layer to correct")
        stats = norm_statistics(model, batches)
        return lambda m: statistics_correction(m, stats, batches)
    return None


def attach_recipe_activations(model: nn.Module, recipe: Mapping[str, Any], batches) -> Optional[ActivationHooks]:
    """Calibrate and attach the input quantizers that ``recipe`` gives its layers (as ``compress``
    does after compressing), so that a stitched configuration is evaluated as the recipe will run;
    None when the recipe quantizes no activation. The caller removes the hooks."""
    from ..recipe import Recipe

    r = Recipe.from_dict(dict(recipe))
    found = find_layers(model, r.targets, r.ignore)
    schemes = {}
    for name, info in found.items():
        sc = r.for_layer(name, type(info.module).__name__)
        if sc is not None and sc.quantization is not None and sc.quantization.activations is not None:
            schemes[name] = sc.quantization.activations
    if not schemes:
        return None
    layers = {n: found[n] for n in schemes}
    return attach(model, layers, calibrate_activation_quantizers(model, layers, schemes, batches))


def as_recipe_runs(model: nn.Module, recipe: Mapping[str, Any], batches, correction: str,
                   fix: Optional[Callable[[nn.Module], None]]) -> Optional[ActivationHooks]:
    """Bring a model holding a configuration's weights to what ``compress`` makes of its recipe:
    BatchNorm re-estimation, then the input quantizers (returned; the caller removes them), then
    statistics correction. ``fix`` is ``make_correction(correction, ...)``."""
    if fix is not None and correction == "bn":
        fix(model)
    hooks = attach_recipe_activations(model, recipe, batches)
    if fix is not None and correction == "statcorr":
        fix(model)
    return hooks


def run_sweep(db: Database, model: nn.Module, data: Iterable, evaluate: Callable[[nn.Module], Dict[str, float]],
              goals: Sequence[Union[str, Goal]], out_dir: Union[str, os.PathLike], *,
              methods: Sequence[str] = METHODS, activation_bits: Optional[int] = 8, buckets: int = 10000,
              uniform_top: int = 3, spdy_restarts: int = 16, spdy_steps: int = 100, spdy_samples: int = 64,
              correction: str = "none", num_calibration_samples: int = 256, transform_fn=None,
              progress: bool = True, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Evaluate every (goal, method) and write ``sweep.json`` and recipes into ``out_dir``.

    ``uniform`` evaluates the ``uniform_top`` feasible uniform settings of lowest score and keeps
    the most accurate (the best uniform setting is a matter of accuracy, not of the proxy score).
    ``activation_bits``: the BOPs cost's activation width, written into the recipes of quantized
    layers so that the model evaluated is the model costed (None: weights only).
    """
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown sweep methods {bad}: use {', '.join(METHODS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    goals = [g if isinstance(g, Goal) else parse_goal(g, **({"activation_bits": activation_bits}
                                                             if g.startswith("bops") and activation_bits else {}))
             for g in goals]
    batches = calibration_batches(data, num_calibration_samples, transform_fn)
    fix = make_correction(correction, batches, model)
    dense_metrics = evaluate(model)
    metric = main_metric(dense_metrics)
    stitch = _Stitcher(db, model)
    norm_state = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in correctable_norms(model).items()}

    def measure(cfg: Configuration, recipe: Mapping[str, Any]) -> Dict[str, float]:
        # As `compress` runs the recipe (the BOPs cost counts the input quantizers' activation_bits).
        stitch.set(cfg.choice)
        hooks = None
        try:
            hooks = as_recipe_runs(model, recipe, batches, correction, fix)
            return evaluate(model)
        finally:
            if hooks is not None:
                hooks.remove()
            mods = dict(model.named_modules())
            for n, sd in norm_state.items():
                mods[n].load_state_dict(sd)

    rows: List[Dict[str, Any]] = []
    try:
        for goal in goals:
            act = activation_bits if goal.cost.name == "bops" else None

            def recipe_of(cfg: Configuration) -> Dict[str, Any]:
                recipe = cfg.recipe(db, activation_bits=act)
                if correction in RECIPE_CORRECTIONS:
                    recipe["corrections"] = dict(RECIPE_CORRECTIONS[correction])
                return recipe

            for method in methods:
                t0 = time.perf_counter()
                if method == "uniform":
                    cands = best_uniform(db, goal, top=uniform_top)
                    scored = [(measure(c, recipe_of(c)), c) for c in cands]
                    metrics, cfg = max(scored, key=lambda mc: mc[0][metric])
                    cfg.info["candidates"] = {c.info["variant"]: m[metric] for m, c in scored}
                elif method == "dp":
                    cfg = select_dp(db, goal, buckets=buckets)
                    metrics = measure(cfg, recipe_of(cfg))
                else:
                    stitch.restore()
                    # SPDY's candidates are scored without activation quantizers (a proxy); the
                    # configuration it returns is measured as the recipe runs.
                    cfg = spdy(db, model, batches, goal, num_samples=spdy_samples, restarts=spdy_restarts,
                               steps=spdy_steps, correction=fix, progress=progress)
                    metrics = measure(cfg, recipe_of(cfg))
                seconds = time.perf_counter() - t0
                tag = f"{method}_{goal.cost.name}_{goal.reduction:g}x"
                recipe = recipe_of(cfg)
                write_text(out / f"{tag}.recipe.yaml", yaml.safe_dump(recipe, sort_keys=False))
                row = {"goal": {"cost": goal.cost.to_dict(), "fraction": goal.fraction, "reduction": goal.reduction},
                       "method": method, "metrics": metrics, "reduction": cfg.reduction, "cost": cfg.cost,
                       "dense_cost": cfg.dense_cost, "score": cfg.score, "seconds": seconds,
                       "choice": {n: v.key for n, v in cfg.choice.items()},
                       "info": {k: v for k, v in cfg.info.items() if k != "coefficients"}, "recipe": f"{tag}.recipe.yaml"}
                rows.append(row)
                log(f"{goal.cost.name} {goal.reduction:g}x {method:8s} {metric} {100 * metrics[metric]:.1f} "
                    f"(reached {cfg.reduction:.2f}x, score {cfg.score:.4g}, {seconds:.1f} s)")
                write_json(out / SWEEP_FILE, _doc(db, dense_metrics, metric, rows, correction, activation_bits), indent=1)
    finally:
        stitch.restore()
    return _doc(db, dense_metrics, metric, rows, correction, activation_bits)


def _doc(db, dense_metrics, metric, rows, correction, activation_bits) -> Dict[str, Any]:
    return {"format": "obcompress-sweep", "version": 1, "database": str(db.directory),
            "database_bytes": db.nbytes, "database_build_seconds": db.build_seconds,
            "layers": db.names, "dense": dense_metrics, "metric": metric, "correction": correction,
            "activation_bits": activation_bits, "runs": rows}


def write_sweep_plots(directory: Union[str, os.PathLike]) -> List[Path]:
    """From ``sweep.json`` in ``directory``: one Pareto plot per cost (accuracy against reduction,
    a line per method) and a per-layer chart of chosen sparsity and bits per (method, goal)."""
    from .plots import layer_chart, pareto_plot
    from .space import Variant

    d = Path(directory)
    path = d / SWEEP_FILE
    if not path.exists():
        raise ValueError(f"{d} has no {SWEEP_FILE}: run `obcompress search sweep` first")
    doc = json.loads(path.read_text())
    if doc.get("format") != "obcompress-sweep":
        raise ValueError(f"{path} is not an obcompress sweep")
    metric = doc["metric"]
    written: List[Path] = []
    by_cost: Dict[str, Dict[str, List]] = {}
    for r in doc["runs"]:
        series = by_cost.setdefault(r["goal"]["cost"]["name"], {})
        series.setdefault(r["method"], []).append((r["goal"]["reduction"], 100 * r["metrics"][metric]))
    for cost, series in by_cost.items():
        series = {m: sorted(pts) for m, pts in series.items()}
        written.append(pareto_plot(series, d / f"pareto_{cost}.png", xlabel=f"{cost} reduction (x)",
                                   ylabel=f"{metric} (%)", dense=100 * doc["dense"][metric],
                                   title=f"{metric} against {cost} reduction"))
    for r in doc["runs"]:
        names = list(r["choice"])
        vs = [Variant.from_key(r["choice"][n]) for n in names]
        tag = f"{r['method']}_{r['goal']['cost']['name']}_{r['goal']['reduction']:g}x"
        written.append(layer_chart(names, [v.sparsity for v in vs], [v.bits for v in vs], d / f"layers_{tag}.png",
                                   title=f"{r['method']} at {r['goal']['reduction']:g}x {r['goal']['cost']['name']}: "
                                         f"{metric} {100 * r['metrics'][metric]:.1f} %"))
    return written
