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
from .costs import CostModel, dense_total, make_cost, model_totals
from .database import Database
from .nonuniform import Configuration, Goal, _Stitcher, best_uniform, parse_goal, select_dp, spdy
from .whole_model import WholeModel

__all__ = ["METHODS", "RECIPE_CORRECTIONS", "as_recipe_runs", "attach_recipe_activations", "make_correction",
           "run_sweep", "main_metric", "write_sweep_plots", "SWEEP_FILE", "read_sweep", "sweep_table"]

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
    # Every run is also costed under the sweep's other costs (and size), over the searched layers and
    # the whole model, so that each Pareto plot can show every configuration the sweep measured.
    costs: Dict[str, CostModel] = {"size": make_cost("size")}
    costs.update({g.cost.name: g.cost for g in goals})
    geoms = db.geometries
    wholes = {name: WholeModel(c, model, db.names, batches) for name, c in costs.items()}
    dense_of = {name: dense_total(c, geoms) for name, c in costs.items()}
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
                whole = wholes[goal.cost.name].of(cfg.cost, cfg.dense_cost)
                row["whole_model"] = whole.to_dict()
                row["reductions"] = {}
                for name, c in costs.items():
                    spent = cfg.cost if name == goal.cost.name else model_totals(c, geoms, cfg.choice)
                    r = wholes[name].of(spent, dense_of[name])
                    row["reductions"][name] = {"searched": r.searched_reduction, "whole": r.reduction}
                rows.append(row)
                log(f"{goal.cost.name} {goal.reduction:g}x {method:8s} {metric} {100 * metrics[metric]:.1f} "
                    f"(reached {cfg.reduction:.2f}x on the searched layers, {whole.reduction:.2f}x on the whole "
                    f"model, score {cfg.score:.4g}, {seconds:.1f} s)")
                write_json(out / SWEEP_FILE, _doc(db, dense_metrics, metric, rows, correction, activation_bits,
                                                  wholes, dense_of), indent=1)
    finally:
        stitch.restore()
    return _doc(db, dense_metrics, metric, rows, correction, activation_bits, wholes, dense_of)


def _doc(db, dense_metrics, metric, rows, correction, activation_bits, wholes, dense_of) -> Dict[str, Any]:
    # whole_model: per cost, what lies outside the searched layers (``rest``) beside their dense
    # cost, from which any searched-layer reduction r maps to (rest + dense) / (rest + dense / r).
    return {"format": "obcompress-sweep", "version": 1, "database": str(db.directory),
            "database_bytes": db.nbytes, "database_build_seconds": db.build_seconds,
            "layers": db.names, "dense": dense_metrics, "metric": metric, "correction": correction,
            "activation_bits": activation_bits,
            "whole_model": {name: {"rest": w.rest, "searched_dense_cost": dense_of[name], "outside": w.outside,
                                   "layers": w.layers, "counts": w.describe()} for name, w in wholes.items()},
            "runs": rows}


def read_sweep(directory: Union[str, os.PathLike]) -> Dict[str, Any]:
    """The ``sweep.json`` that ``run_sweep`` wrote into ``directory``."""
    d = Path(directory)
    path = d / SWEEP_FILE
    if not path.exists():
        raise ValueError(f"{d} has no {SWEEP_FILE}: run `obcompress search sweep` first")
    doc = json.loads(path.read_text())
    if doc.get("format") != "obcompress-sweep":
        raise ValueError(f"{path} is not an obcompress sweep")
    return doc


def _reached(run: Mapping[str, Any], cost: str, where: str = "searched") -> Optional[float]:
    """A run's reduction under ``cost`` (over the searched layers or the whole model), None where the
    sweep did not record it (a sweep written before whole-model figures: its own goal's cost only)."""
    if "reductions" in run:
        r = run["reductions"].get(cost)
        return None if r is None else r[where]
    if cost == run["goal"]["cost"]["name"] and where == "searched":
        return run["reduction"]
    return None


def sweep_table(doc: Mapping[str, Any]) -> str:
    """The runs of a sweep as a table: goal, method, metric, and the reduction each reached over the
    searched layers (what the goal counts) and over the whole model."""
    metric = doc["metric"]
    head = f"{'goal':<12} {'method':<8} {metric:>10} {'searched layers':>16} {'whole model':>12}"
    lines = [head, "-" * len(head)]
    for r in doc["runs"]:
        cost = r["goal"]["cost"]["name"]
        whole = _reached(r, cost, "whole")
        lines.append(f"{cost + ' ' + format(r['goal']['reduction'], 'g') + 'x':<12} {r['method']:<8} "
                     f"{100 * r['metrics'][metric]:>9.2f}% {r['reduction']:>15.2f}x "
                     + (f"{whole:>11.2f}x" if whole is not None else f"{'-':>12}"))
    lines.append(f"dense {metric} {100 * doc['dense'][metric]:.2f}%")
    for cost, w in doc.get("whole_model", {}).items():
        lines.append(f"{cost}: {w['counts']}")
    return "\n".join(lines)


def write_sweep_plots(directory: Union[str, os.PathLike]) -> List[Path]:
    """From ``sweep.json`` in ``directory``: one Pareto plot per goal cost and a per-layer chart of
    chosen sparsity and bits per (method, goal).

    A Pareto plot draws every configuration at the reduction it reached (not at its goal), over
    the searched layers; a method's curve joins its runs aimed at this cost, and its runs aimed at
    another cost are hollow markers at what they reached in this one. A top axis gives the whole
    model's reduction where it differs. Per-layer charts list the layers in the model's order.
    """
    from .plots import layer_chart, pareto_plot
    from .space import Variant

    d = Path(directory)
    doc = read_sweep(d)
    metric = doc["metric"]
    written: List[Path] = []
    costs: List[str] = []
    for r in doc["runs"]:
        if r["goal"]["cost"]["name"] not in costs:
            costs.append(r["goal"]["cost"]["name"])
    for cost in costs:
        series: Dict[str, List] = {}
        others: Dict[str, List] = {}
        for r in doc["runs"]:
            x = _reached(r, cost)
            if x is None:
                continue
            point = (x, 100 * r["metrics"][metric])
            (series if r["goal"]["cost"]["name"] == cost else others).setdefault(r["method"], []).append(point)
        top = None
        w = doc.get("whole_model", {}).get(cost)
        if w is not None and w["rest"] > 0:
            rest, dense = w["rest"], w["searched_dense_cost"]
            top = ("whole model (x)", lambda x, rest=rest, dense=dense: (rest + dense) / (rest + dense / x))
        written.append(pareto_plot({m: sorted(p) for m, p in series.items()}, d / f"pareto_{cost}.png",
                                   xlabel=f"{cost} reduction of the searched layers (x)", ylabel=f"{metric} (%)",
                                   dense=100 * doc["dense"][metric], title=f"{metric} against {cost} reduction",
                                   others=others or None, others_label="aimed at another cost",
                                   top_axis=top))
    # The model's order (the sweep records its layers so); a layer missing there goes last.
    order = {n: i for i, n in enumerate(doc.get("layers") or [])}
    for r in doc["runs"]:
        names = sorted(r["choice"], key=lambda n: order.get(n, len(order)))
        vs = [Variant.from_key(r["choice"][n]) for n in names]
        cost = r["goal"]["cost"]["name"]
        tag = f"{r['method']}_{cost}_{r['goal']['reduction']:g}x"
        whole = _reached(r, cost, "whole")
        reached = f"reached {r['reduction']:.2f}x" + (f", whole model {whole:.2f}x" if whole is not None else "")
        written.append(layer_chart(names, [v.sparsity for v in vs], [v.bits for v in vs], d / f"layers_{tag}.png",
                                   title=f"{r['method']} at {r['goal']['reduction']:g}x {cost} ({reached}): "
                                         f"{metric} {100 * r['metrics'][metric]:.1f} %"))
    return written
