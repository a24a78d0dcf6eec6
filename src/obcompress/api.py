"""``compress(model, recipe, dataset)``: compress a trained model in place, layer by layer.

Data flows one way: calibration batches -> each selected layer's Hessian H = 2XX^T/n (model.
calibration) -> the recipe's solver on each (group of the) layer's weight (solvers) -> weights
written back (model.layers) -> a per-layer report. ``calibration: parallel`` takes every layer's H
from the dense model in one pass (the OBC paper's setting); ``sequential`` re-runs the calibration
data before each layer, through the layers already compressed, so that each layer corrects the
error of the ones before it (one forward pass per layer, still only the running Hessians in memory).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Union

import torch
from torch import nn

from ._progress import progress_bar
from .model.activations import ActivationHooks, ActivationQuantizer, attach, calibrate_activation_quantizers
from .model.calibration import calibration_batches, collect_hessians, count_samples
from .model.corrections import norm_statistics, reestimate_batchnorm, statistics_correction
from .model.layers import LayerInfo, find_layers, set_weight_groups, weight_groups
from .recipe import LayerScheme, Recipe
from .solvers import QuantGrid, SolverResult, parse_mask_structure
from .solvers.registry import get_solver


@dataclass
class LayerReport:
    """What happened to one layer: the loss is the sum over its groups of 1/2 tr(dW H dW^T)."""

    name: str
    kind: str
    shape: List[int]  # [groups, rows, cols]
    method: str
    sparsity: float
    bits: Optional[int]
    loss: float
    seconds: float
    damp: float
    engine: str = "torch"  # the solver's step engine: "native" (the fused C kernel) or "torch"


@dataclass
class LayerState:
    """What an artifact needs of a compressed layer: its module, grids and mask, per group."""

    info: LayerInfo
    scheme: LayerScheme
    grids: List[Optional[QuantGrid]]  # one per group (None: not quantized)
    mask: Optional[torch.Tensor]  # (groups, rows, cols) bool, True = kept; None: dense


@dataclass
class Result:
    recipe: Recipe
    layers: List[LayerReport] = field(default_factory=list)
    calibration_samples: int = 0
    seconds: float = 0.0
    states: Dict[str, LayerState] = field(default_factory=dict, repr=False)
    # W+A recipes: the input quantizers (simulated by forward pre-hooks, removable with .remove()).
    activation_quantizers: Dict[str, ActivationQuantizer] = field(default_factory=dict, repr=False)
    activation_hooks: Optional[ActivationHooks] = field(default=None, repr=False)
    corrections: Dict[str, Any] = field(default_factory=dict)
    metrics: Optional[Dict[str, float]] = None  # the caller's evaluation, kept in the artifact's report
    # Layers left unpruned because the mask structure does not fit them (``unfit_layers: dense``).
    unfit: Dict[str, str] = field(default_factory=dict)

    @property
    def report(self) -> List[Dict[str, Any]]:
        return [asdict(r) for r in self.layers]

    def table(self) -> str:
        head = f"{'layer':<32} {'shape':>14} {'method':>10} {'sparsity':>8} {'bits':>4} {'loss':>11} {'s':>7}"
        lines = [head, "-" * len(head)]
        for r in self.layers:
            shape = "x".join(str(x) for x in (r.shape if r.shape[0] > 1 else r.shape[1:]))
            bits = "-" if r.bits is None else str(r.bits)
            lines.append(f"{r.name:<32} {shape:>14} {r.method:>10} {r.sparsity:>8.3f} {bits:>4} {r.loss:>11.4g} "
                         f"{r.seconds:>7.2f}")
        total = sum(r.loss for r in self.layers)
        engines = "+".join(sorted({e for r in self.layers for e in r.engine.split("+")}))
        lines.append(f"{len(self.layers)} layers, total loss {total:.4g}, {self.seconds:.1f} s, "
                     f"{self.calibration_samples} calibration samples, solver engine {engines}")
        for name, why in self.unfit.items():
            lines.append(f"not pruned (unfit_layers: dense): {name}: {why}")
        return "\n".join(lines)


def _as_recipe(recipe: Union[Recipe, dict, str]) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    if isinstance(recipe, str):
        return Recipe.from_yaml(recipe)
    raise ValueError(f"recipe must be a Recipe, a dict or YAML (text or path), got {type(recipe).__name__}")


def _grid(W: torch.Tensor, scheme: LayerScheme) -> Optional[QuantGrid]:
    q = scheme.quantization
    return None if q is None else QuantGrid.fit(W, **q.grid_kwargs())


def solve_layer(W: torch.Tensor, H: torch.Tensor, scheme: LayerScheme, columns_last: Optional[int]) -> SolverResult:
    """Compress one (group of a) layer's weight as ``scheme`` says, with the registered solver it
    names (solvers.registry); the result's loss is measured.

    The grid is always fitted on the dense weight: a least-squares re-fit on a sparse support
    stretches a row's range, and a grid fitted on the stretched row is coarser.
    """
    q, sp = scheme.quantization, scheme.sparsity
    return get_solver(scheme.solver).solve(
        W, H, grid=_grid(W, scheme), mask_structure=None if sp is None else sp.mask_structure,
        sparsity=None if sp is None else sp.sparsity, columns_last=columns_last, damp=scheme.damp,
        act_order=q is not None and q.act_order)


def compress(
    model: nn.Module,
    recipe: Union[Recipe, dict, str],
    dataset: Iterable,
    *,
    num_calibration_samples: int = 256,
    transform_fn: Optional[Callable] = None,
    progress: bool = True,
) -> Result:
    """Compress ``model`` in place as ``recipe`` says, from calibration ``dataset``; returns the report.

    ``dataset``: any iterable or DataLoader of batches (a tensor, an (x, y) pair, or a dict of model
    keyword arguments); ``transform_fn(batch)`` maps a batch to the model's input instead.
    Errors name the layer: ``ValueError("layer <name>: ...")``.
    """
    t0 = time.perf_counter()
    recipe = _as_recipe(recipe)
    found = find_layers(model, recipe.targets, recipe.ignore)
    # An override may leave its layer with nothing to do (``sparsity: null`` in a pruning-only
    # recipe): it still counts as used, against every layer the recipe selects.
    unused = recipe.unused_overrides([n for n, info in found.items() if recipe.selects(n, info.module)])
    if unused:
        raise ValueError(f"recipe layer overrides match no selected layer: {unused}")
    schemes: Dict[str, LayerScheme] = {}
    unfit: Dict[str, str] = {}
    for name, info in found.items():
        scheme = recipe.for_layer(name, type(info.module).__name__)
        if scheme is None:
            continue
        why = _unfit_reason(info, scheme)
        if why is not None:
            if scheme.sparsity.unfit_layers != "dense":
                raise ValueError(
                    f"layer {name}: {why}. Leave the layer out (ignore: ['{name}']), give it its own "
                    f"setting (layers: {{'{name}': {{sparsity: null}}}}), or keep every such layer unpruned "
                    "with sparsity.unfit_layers: dense")
            unfit[name] = why
            scheme = dataclasses.replace(scheme, sparsity=None)
            if not scheme.compresses:
                continue
        schemes[name] = scheme
    if not schemes:
        raise ValueError("the recipe selects no layer of this model")
    layers = {name: found[name] for name in schemes}
    batches = calibration_batches(dataset, num_calibration_samples, transform_fn)
    n_samples = sum(count_samples(b) for b in batches)
    corr = recipe.corrections
    if corr.bn_reestimation and not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise ValueError("corrections.bn_reestimation: the model has no BatchNorm layer")
    # Dense output statistics now, so that statistics correction needs no dense copy of the model.
    dense_stats = norm_statistics(model, batches) if corr.statistics_correction else None
    act_schemes = {n: sc.quantization.activations for n, sc in schemes.items()
                   if sc.quantization is not None and sc.quantization.activations is not None}
    norms = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
    norm_state = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in model.named_modules()
                  if isinstance(m, norms)}

    was_training = model.training
    model.eval()
    result = Result(recipe=recipe, calibration_samples=n_samples, unfit=unfit)
    # A failure half-way leaves the model as it was, not half compressed.
    originals = {name: info.module.weight.detach().clone() for name, info in layers.items()}
    try:
        hessians = collect_hessians(model, layers, batches) if recipe.calibration == "parallel" else {}
        bar = progress_bar(list(layers.items()), desc="compress", unit="layer", progress=progress)
        for name, info in bar:
            t_layer = time.perf_counter()
            if recipe.calibration == "sequential":
                # Only the layers up to this one need to run on each batch.
                H = collect_hessians(model, {name: info}, batches, stop_early=True)[name]
            else:
                H = hessians.pop(name)
            report, state = _compress_layer(name, info, H, schemes[name])
            report.seconds = time.perf_counter() - t_layer
            result.layers.append(report)
            result.states[name] = state
            bar.set_postfix_str(f"{name}: loss {report.loss:.3g}, {report.seconds:.1f} s")
        bar.close()
        if corr.bn_reestimation:
            result.corrections["bn_reestimation"] = reestimate_batchnorm(model, batches)
        if act_schemes:
            # Calibrated on the compressed (and re-estimated) model: the ranges it will really see.
            result.activation_quantizers = calibrate_activation_quantizers(model, layers, act_schemes, batches)
            result.activation_hooks = attach(model, layers, result.activation_quantizers)
        if corr.statistics_correction:
            # With the input quantizers attached, this also corrects the mean shift of activation rounding.
            result.corrections["statistics_correction"] = statistics_correction(model, dense_stats, batches)
    except BaseException:
        if result.activation_hooks is not None:
            result.activation_hooks.remove()
        modules = dict(model.named_modules())
        with torch.no_grad():
            for name, w in originals.items():
                layers[name].module.weight.copy_(w)
            for name, sd in norm_state.items():
                modules[name].load_state_dict(sd)
        raise
    finally:
        model.train(was_training)
    result.seconds = time.perf_counter() - t0
    return result


def _unfit_reason(info: LayerInfo, scheme: LayerScheme) -> Optional[str]:
    """Why the scheme's mask structure cannot prune this layer (None when it can): found before
    any calibration or solving is spent."""
    sp = scheme.sparsity
    if sp is None:
        return None
    try:
        parse_mask_structure(sp.mask_structure, info.cols)
    except ValueError as e:
        return str(e)
    return None


def _compress_layer(name: str, info: LayerInfo, H: torch.Tensor, scheme: LayerScheme):
    Wg = weight_groups(info)
    Hg = H if H.dim() == 3 else H.unsqueeze(0)
    columns_last = info.taps if info.taps > 1 else None
    out = torch.empty_like(Wg)
    loss, kept, damp, method, engines = 0.0, 0, 0.0, scheme.solver, set()
    grids, masks = [], []
    for g in range(Wg.shape[0]):
        try:
            res = solve_layer(Wg[g], Hg[g], scheme, columns_last)
        except ValueError as e:
            where = f"layer {name}" + (f" (group {g})" if Wg.shape[0] > 1 else "")
            raise ValueError(f"{where}: {e}") from None
        out[g] = res.weight
        grids.append(res.grid if scheme.quantization is not None else None)
        masks.append(res.mask)
        loss += res.loss
        kept += int(res.mask.sum()) if res.mask is not None else Wg[g].numel()
        damp = max(damp, res.damp)
        method = res.method or method
        engines.add(res.info["engine"])
    set_weight_groups(info, out)
    mask = None if all(m is None for m in masks) else torch.stack(
        [m if m is not None else torch.ones_like(out[0], dtype=torch.bool) for m in masks])
    state = LayerState(info=info, scheme=scheme, grids=grids, mask=mask)
    q = scheme.quantization
    report = LayerReport(
        name=name,
        kind=info.kind,
        shape=list(Wg.shape),
        method=method,
        sparsity=1.0 - kept / Wg.numel(),
        bits=None if q is None else q.num_bits,
        loss=loss,
        seconds=0.0,
        damp=damp,
        engine="+".join(sorted(engines)),
    )
    return report, state
