"""``compress(model, recipe, dataset)``: compress a trained model in place, layer by layer.

Data flows one way: calibration batches -> each selected layer's Hessian H = 2XX^T/n (model.
calibration) -> the recipe's solver on each (group of the) layer's weight (solvers), one executor
job per layer (executor: here or on Ray) -> weights written back (model.layers) by this process
alone -> a per-layer report. ``calibration: parallel`` takes every layer's H from the dense model
in one pass (the OBC paper's setting); ``sequential`` takes each layer's H from the inputs the
layers already compressed give it, so that each layer corrects the error of the ones before it:
block by block where the model is a stack of blocks (model.blocks), else layer by layer.
magnitude and RTN need no H: it is collected for them only with ``layer_loss: true``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Union

import torch
from torch import nn

from ._progress import progress_bar
from .executor import EtaLine, LayerJob, format_seconds, make_executor
from .jobs import LONG_SOLVE_SECONDS, LayerSolution, estimate_seconds, exact_passes, solve_layer_groups
from .model.activations import ActivationHooks, ActivationQuantizer, attach, calibrate_activation_quantizers
from .model.blocks import sequential_calibration
from .model.calibration import calibration_batches, collect_hessians, count_samples
from .model.corrections import norm_statistics, reestimate_batchnorm, statistics_correction
from .model.layers import LayerInfo, find_layers, set_weight_groups, weight_groups
from .recipe import LayerScheme, Recipe
from .solvers import QuantGrid, parse_mask_structure


@dataclass
class LayerReport:
    """What happened to one layer: the loss is the sum over its groups of 1/2 tr(dW H dW^T)."""

    name: str
    kind: str
    shape: List[int]  # [groups, rows, cols]
    method: str
    sparsity: float
    bits: Optional[int]
    loss: Optional[float]  # None: not measured (magnitude / RTN without ``layer_loss: true`` have no H)
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
    # How the Hessians were collected (sequential: blocks or layers, why, passes, seconds) and where
    # the solves ran.
    calibration: Dict[str, Any] = field(default_factory=dict)
    executor: str = "local"

    @property
    def total_loss(self) -> float:
        """The summed layer loss; NaN when some layer's loss was not measured."""
        return sum(float("nan") if r.loss is None else r.loss for r in self.layers)

    @property
    def report(self) -> List[Dict[str, Any]]:
        return [asdict(r) for r in self.layers]

    def table(self) -> str:
        head = f"{'layer':<32} {'shape':>14} {'method':>10} {'sparsity':>8} {'bits':>4} {'loss':>11} {'s':>7}"
        lines = [head, "-" * len(head)]
        for r in self.layers:
            shape = "x".join(str(x) for x in (r.shape if r.shape[0] > 1 else r.shape[1:]))
            bits = "-" if r.bits is None else str(r.bits)
            loss = "-" if r.loss is None else f"{r.loss:.4g}"
            lines.append(f"{r.name:<32} {shape:>14} {r.method:>10} {r.sparsity:>8.3f} {bits:>4} {loss:>11} "
                         f"{r.seconds:>7.2f}")
        measured = [r.loss for r in self.layers if r.loss is not None]
        total = f"total loss {sum(measured):.4g}" if measured else "no layer loss measured"
        if measured and len(measured) < len(self.layers):
            total += f" over the {len(measured)} layers with a Hessian"
        engines = "+".join(sorted({e for r in self.layers for e in r.engine.split("+") if e}))
        lines.append(f"{len(self.layers)} layers, {total}, {self.seconds:.1f} s, "
                     f"{self.calibration_samples} calibration samples, solver engine {engines or '-'}")
        if len(measured) < len(self.layers):
            lines.append("loss '-': magnitude / RTN without a Hessian (set layer_loss: true to measure it)")
        cal = self.calibration
        if cal.get("path") == "blocks":
            lines.append(f"sequential calibration block by block: {cal['blocks']} blocks ({cal['found_by']})")
        elif cal.get("path") == "layers":
            lines.append(f"sequential calibration layer by layer: {cal.get('reason')}")
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


def compress(
    model: nn.Module,
    recipe: Union[Recipe, dict, str],
    dataset: Iterable,
    *,
    num_calibration_samples: int = 256,
    transform_fn: Optional[Callable] = None,
    progress: bool = True,
    executor: Any = None,
    ray_address: Optional[str] = None,
    device: Optional[str] = None,
) -> Result:
    """Compress ``model`` in place as ``recipe`` says, from calibration ``dataset``; returns the report.

    ``dataset``: any iterable or DataLoader of batches (a tensor, an (x, y) pair, or a dict of model
    keyword arguments); ``transform_fn(batch)`` maps a batch to the model's input instead.
    ``executor`` ("local", "ray" or an ``obcompress.executor.Executor``), ``ray_address`` and
    ``device`` override the recipe's ``executor`` and ``device``.
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
    run_on = _solver_device(device if device is not None else recipe.device, model)
    pool = make_executor(executor if executor is not None else recipe.executor, ray_address)
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
    # magnitude and RTN choose their weights without H: it only feeds their reported loss.
    needs_h = {n for n, sc in schemes.items() if recipe.layer_loss or sc.solver not in ("magnitude", "rtn")}

    was_training = model.training
    model.eval()
    result = Result(recipe=recipe, calibration_samples=n_samples, unfit=unfit, executor=pool.kind)
    # A failure half-way leaves the model as it was, not half compressed.
    originals = _Originals(layers, SPILL_BYTES)
    home = _single_device(model) if run_on is not None and recipe.calibration == "parallel" else None
    bar = progress_bar(total=len(layers), desc="compress", unit="layer", progress=progress)

    def say(msg: str) -> None:
        if progress:
            from tqdm.auto import tqdm

            tqdm.write(msg, file=sys.stderr)

    def compress_group(names: List[str], hessians: Dict[str, torch.Tensor]) -> None:
        """Solve ``names`` through the executor and write each result into the model as it arrives."""
        jobs = []
        for name in names:
            info = layers[name]
            H = hessians.get(name)
            Hg = None if H is None else (H if H.dim() == 3 else H.unsqueeze(0))
            Wg = weight_groups(info)
            if pool.kind != "local":
                Wg, Hg = Wg.cpu(), None if Hg is None else Hg.cpu()
            shape = tuple(Wg.shape)
            est = estimate_seconds(exact_passes(schemes[name]), shape) if _wide(shape) else 0.0
            job = LayerJob(name, solve_layer_groups,
                           (name, Wg, Hg, schemes[name], info.taps if info.taps > 1 else None,
                            None if run_on is None else str(run_on)),
                           gpus=1.0 if run_on is not None and run_on.type == "cuda" and pool.kind != "local" else 0.0,
                           estimate=est)
            if est > LONG_SOLVE_SECONDS:
                more = ", or --executor ray to solve layers side by side" if pool.kind == "local" else ""
                say(f"layer {name}: exact {'+'.join(_exact_kinds(schemes[name]))} on "
                    f"{'x'.join(str(x) for x in (shape if shape[0] > 1 else shape[1:]))} takes about "
                    f"{format_seconds(est)} here (an upper bound: rows x cols^3 at this machine's measured rate); "
                    f"faster: solver sparsegpt / gptq for it (layers: {{{name}: {{solver: sparsegpt}}}}){more}")
                job.progress = EtaLine(lambda text, n=name: bar.set_postfix_str(f"{n}: {text}", refresh=True))
            jobs.append(job)
        hessians.clear()
        for i, sol in pool.run(jobs):
            name = names[i]
            report, state = _apply_solution(name, layers[name], schemes[name], sol)
            result.layers.append(report)
            result.states[name] = state
            bar.update(1)
            loss = "-" if report.loss is None else f"{report.loss:.3g}"
            bar.set_postfix_str(f"{name}: loss {loss}, {report.seconds:.1f} s")

    if pool.kind != "local":
        say(f"per-layer solves on {pool.describe()}")
    try:
        free = [n for n in layers if n not in needs_h]
        if recipe.calibration == "sequential":
            # Layers that need no H first: every later layer then calibrates on their output.
            if free:
                compress_group(free, {})
            if needs_h:
                result.calibration = sequential_calibration(
                    model, {n: layers[n] for n in needs_h}, batches, compress_group,
                    sequential_targets=recipe.sequential_targets, device=run_on, progress=progress, log=say)
        else:
            if home is not None:
                model.to(run_on)
            hessians = {}
            if needs_h:
                hessians = collect_hessians(model, {n: layers[n] for n in layers if n in needs_h}, batches,
                                            progress=progress)
            result.calibration = {"path": "parallel", "model_passes": 1 if needs_h else 0}
            compress_group(list(layers), hessians)
            del hessians
            if home is not None:
                model.to(home)
        bar.close()
        order = {n: i for i, n in enumerate(layers)}
        result.layers.sort(key=lambda r: order[r.name])
        result.states = {n: result.states[n] for n in layers}
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
        bar.close()
        if home is not None:
            model.to(home)
        if result.activation_hooks is not None:
            result.activation_hooks.remove()
        modules = dict(model.named_modules())
        with torch.no_grad():
            originals.restore()
            for name, sd in norm_state.items():
                modules[name].load_state_dict(sd)
        raise
    finally:
        model.train(was_training)
        originals.close()
    result.seconds = time.perf_counter() - t0
    return result


# Above this many bytes the weights kept for a restore go to a temporary directory, not memory:
# the Linear weights of a 135M-parameter LLM are 425 MB of RSS that would only serve a failure.
SPILL_BYTES = 64 << 20


class _Originals:
    """The weights of the layers under compression as they were, put back if ``compress`` fails
    half-way. Held in memory up to ``spill_bytes`` in all, else written once to a temporary
    directory (removed by ``close``) and read back only by ``restore``."""

    def __init__(self, layers: Dict[str, LayerInfo], spill_bytes: int):
        self.layers = layers
        weights = {name: info.module.weight.detach() for name, info in layers.items()}
        total = sum(w.numel() * w.element_size() for w in weights.values())
        self.directory = None
        self.memory: Dict[str, torch.Tensor] = {}
        if total <= spill_bytes:
            self.memory = {name: w.clone() for name, w in weights.items()}
            return
        from safetensors.torch import save_file

        self.directory = tempfile.TemporaryDirectory(prefix="obcompress-originals-")
        for i, w in enumerate(weights.values()):
            save_file({"weight": w.to("cpu").contiguous()}, self._path(i))

    def _path(self, i: int) -> str:
        return os.path.join(self.directory.name, f"{i}.safetensors")

    def restore(self) -> None:
        if self.directory is None:
            for name, w in self.memory.items():
                self.layers[name].module.weight.copy_(w)
            return
        from safetensors import safe_open

        for i, info in enumerate(self.layers.values()):
            with safe_open(self._path(i), framework="pt") as f:
                info.module.weight.copy_(f.get_tensor("weight"))

    def close(self) -> None:
        self.memory = {}
        if self.directory is not None:
            self.directory.cleanup()
            self.directory = None


def _wide(shape) -> bool:
    """Worth timing an estimate for: about a second or more of exact solving on a laptop core."""
    groups, rows, cols = shape
    return groups * rows * float(cols) ** 3 > 1e10


def _exact_kinds(scheme: LayerScheme) -> List[str]:
    return (["ExactOBS"] if scheme.sparsity is not None else []) + (["OBQ"] if scheme.quantization is not None else [])


def _solver_device(device: Optional[str], model: nn.Module) -> Optional[torch.device]:
    """The device the recipe or caller asks for (None: each layer's own), checked to exist here."""
    if device is None:
        return None
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device}: no CUDA device is available here (leave device unset, or cpu)")
    return dev


def _single_device(model: nn.Module) -> torch.device:
    devices = {p.device for p in model.parameters()} | {b.device for b in model.buffers()}
    if len(devices) != 1:
        raise ValueError(f"device: the model's tensors are on several devices ({sorted(map(str, devices))}); "
                         "leave device unset to calibrate each layer where it is")
    return devices.pop()


def _apply_solution(name: str, info: LayerInfo, scheme: LayerScheme, sol: LayerSolution):
    """Write a layer's solution into the model; its report line and artifact state."""
    out = sol.weight
    set_weight_groups(info, out)
    masks = sol.masks
    mask = None if all(m is None for m in masks) else torch.stack(
        [m if m is not None else torch.ones_like(out[0], dtype=torch.bool) for m in masks])
    state = LayerState(info=info, scheme=scheme, grids=list(sol.grids), mask=mask)
    q = scheme.quantization
    report = LayerReport(
        name=name,
        kind=info.kind,
        shape=list(out.shape),
        method=sol.method,
        sparsity=1.0 - sol.kept / out.numel(),
        bits=None if q is None else q.num_bits,
        loss=sol.loss,
        seconds=sol.seconds,
        damp=sol.damp,
        engine=sol.info.get("engine", ""),
    )
    return report, state


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
