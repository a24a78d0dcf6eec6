"""The per-layer half of ``obcompress demo``: every layer solver on the real layers of a digits CNN.

Trains (or loads from the cache) the scikit-learn digits CNN, collects each layer's Hessian from
calibration images of the training split (``model.collect_hessians``, the dense model: parallel
calibration), and compresses each layer with every solver next to its baseline (round-to-nearest
for quantization, magnitude for pruning). It prints the layer loss 1/2 tr(dW H dW^T) and the
seconds of each solver, then the test accuracy of the whole model with all layers compressed at
once by the same solver.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, TextIO

import torch

from .._progress import progress_bar
from ..model import collect_hessians, find_layers, weight_groups
from ..solvers import (
    QuantGrid,
    exact_obs_prune,
    gptq_quantize,
    layer_loss,
    magnitude_prune,
    obq_quantize,
    rtn_quantize,
    sparsegpt_prune,
)

BITS = 4


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    baseline: Optional[str]  # key of the method this one is compared with (None: it is a baseline)
    nm: bool  # needs cols divisible by 4 (2:4 structure)
    run: Callable[["LayerContext"], torch.Tensor]  # returns the compressed weight (rows x cols)


@dataclass
class LayerContext:
    """One layer's problem, plus the results of earlier methods that later ones reuse."""

    name: str
    W: torch.Tensor  # (rows, cols) float32
    H: torch.Tensor  # (cols, cols) float64
    columns_last: Optional[int]  # kh*kw for convs, None for linear layers
    grid: object  # QuantGrid fitted on W
    results: Dict[str, object] = field(default_factory=dict)  # key -> SolverResult
    seconds: Dict[str, float] = field(default_factory=dict)  # key -> measured wall time
    extra_seconds: Dict[str, float] = field(default_factory=dict)  # time of reused results


def _fit_grid(W: torch.Tensor):
    return QuantGrid.fit(W, BITS, symmetric=True, strategy="channel")


def _keep(ctx: LayerContext, key: str, result) -> torch.Tensor:
    ctx.results[key] = result
    return result.weight


def _reuse(ctx: LayerContext, key: str, user: str, run) -> object:
    """The result of method ``key`` for method ``user``: computed now, or reused with its time charged."""
    if key in ctx.results:
        ctx.extra_seconds[user] = ctx.seconds[key]
    else:
        run(ctx)
    return ctx.results[key]


def _rtn(ctx):
    return _keep(ctx, "rtn4", rtn_quantize(ctx.W, ctx.grid, H=ctx.H))


def _gptq(ctx):
    return _keep(ctx, "gptq4", gptq_quantize(ctx.W, ctx.H, ctx.grid))


def _obq(ctx):
    return _keep(ctx, "obq4", obq_quantize(ctx.W, ctx.H, ctx.grid))


def _mag50(ctx):
    return _keep(ctx, "mag50", magnitude_prune(ctx.W, 0.5, H=ctx.H))


def _sgpt50(ctx):
    return _keep(ctx, "sgpt50", sparsegpt_prune(ctx.W, ctx.H, 0.5))


def _obs50(ctx):
    return _keep(ctx, "obs50", exact_obs_prune(ctx.W, ctx.H, 0.5))


def _mag24(ctx):
    f = magnitude_prune
    return _keep(ctx, "mag24", f(ctx.W, mask_structure="2:4", H=ctx.H, columns_last=ctx.columns_last))


def _sgpt24(ctx):
    f = sparsegpt_prune
    return _keep(ctx, "sgpt24", f(ctx.W, ctx.H, mask_structure="2:4", columns_last=ctx.columns_last))


def _obs24(ctx):
    f = exact_obs_prune
    return _keep(ctx, "obs24", f(ctx.W, ctx.H, mask_structure="2:4", columns_last=ctx.columns_last))


def _mag24_rtn(ctx):
    pruned = _reuse(ctx, "mag24", "mag24_rtn4", _mag24)
    # Magnitude pruning keeps each row's largest |w|, so the symmetric grid of the dense row fits
    # the pruned row as well, and zero is a grid point: pruned weights stay exactly zero.
    return rtn_quantize(pruned.weight, ctx.grid).weight


def _sgpt24_q(ctx):
    f = sparsegpt_prune
    return f(ctx.W, ctx.H, mask_structure="2:4", grid=ctx.grid, columns_last=ctx.columns_last).weight


def _obc24_q(ctx):
    pruned = _reuse(ctx, "obs24", "obc24_4", _obs24)
    # OBQ re-fits the dense W on the mask's support itself, so its loss is against the dense W.
    # The grid stays the dense row's: the re-fit can stretch a row's range (3x on these layers),
    # and a grid fitted on the stretched row is much coarser.
    return obq_quantize(ctx.W, ctx.H, ctx.grid, mask=pruned.mask).weight


METHODS: List[Method] = [
    Method("rtn4", f"RTN {BITS}-bit", None, False, _rtn),
    Method("gptq4", f"GPTQ {BITS}-bit", "rtn4", False, _gptq),
    Method("obq4", f"OBQ {BITS}-bit", "rtn4", False, _obq),
    Method("mag50", "magnitude 50%", None, False, _mag50),
    Method("sgpt50", "SparseGPT 50%", "mag50", False, _sgpt50),
    Method("obs50", "ExactOBS 50%", "mag50", False, _obs50),
    Method("mag24", "magnitude 2:4", None, True, _mag24),
    Method("sgpt24", "SparseGPT 2:4", "mag24", True, _sgpt24),
    Method("obs24", "ExactOBS 2:4", "mag24", True, _obs24),
    Method("mag24_rtn4", f"magnitude 2:4 + RTN {BITS}-bit", None, True, _mag24_rtn),
    Method("sgpt24_4", f"SparseGPT 2:4 + {BITS}-bit", "mag24_rtn4", True, _sgpt24_q),
    Method("obc24_4", f"ExactOBS 2:4 + OBQ {BITS}-bit", "mag24_rtn4", True, _obc24_q),
]
METHOD_KEYS = [m.key for m in METHODS]


@dataclass
class LayerRow:
    layer: str
    method: str
    label: str
    loss: float
    baseline: Optional[str]
    baseline_loss: float
    seconds: float

    @property
    def ratio(self) -> float:
        if self.baseline is None or not math.isfinite(self.baseline_loss):
            return float("nan")
        if self.baseline_loss == 0:
            return 1.0 if self.loss == 0 else float("inf")
        return self.loss / self.baseline_loss


@dataclass
class DemoReport:
    dense_accuracy: float
    layers: Dict[str, tuple]  # name -> (rows, cols)
    rows: List[LayerRow]
    accuracy: Dict[str, float]  # method key -> test accuracy with all layers compressed
    skipped: Dict[str, List[str]]  # method key -> layers left dense (cols not divisible by 4)
    calibration_samples: int
    seconds: float

    def row(self, layer: str, method: str) -> LayerRow:
        for r in self.rows:
            if r.layer == layer and r.method == method:
                return r
        raise KeyError((layer, method))


def _fmt_loss(x: float) -> str:
    return "-" if not math.isfinite(x) else f"{x:.4g}"


def format_layer_table(name: str, shape: tuple, rows: List[LayerRow]) -> str:
    header = f"{'method':<28} {'loss':>11} {'x baseline':>10} {'seconds':>8}"
    lines = [f"layer {name}  ({shape[0]} x {shape[1]})", header, "-" * len(header)]
    for r in rows:
        ratio = "" if r.baseline is None else f"{r.ratio:.3g}"
        lines.append(f"{r.label:<28} {_fmt_loss(r.loss):>11} {ratio:>10} {r.seconds:>8.3f}")
    return "\n".join(lines)


def format_accuracy_table(report: DemoReport, methods: Sequence[Method]) -> str:
    header = f"{'method':<28} {'test acc':>9} {'change':>8}  note"
    lines = [
        "test accuracy, all layers compressed at once (Hessians of the dense model)",
        header,
        "-" * len(header),
        f"{'dense':<28} {100 * report.dense_accuracy:>8.1f}%",
    ]
    for m in methods:
        if m.key not in report.accuracy:
            continue
        acc = report.accuracy[m.key]
        note = ""
        if report.skipped.get(m.key):
            note = "dense: " + ", ".join(report.skipped[m.key]) + " (cols not divisible by 4)"
        change = 100 * (acc - report.dense_accuracy)
        lines.append(f"{m.label:<28} {100 * acc:>8.1f}% {change:>+7.1f}  {note}".rstrip())
    return "\n".join(lines)


def run_demo(
    calibration_samples: int = 1024,
    methods: Optional[Sequence[str]] = None,
    layers: Optional[Sequence[str]] = None,
    out: Optional[TextIO] = None,
    progress: bool = True,
) -> DemoReport:
    """Run the demo and print its tables to ``out`` (default stdout); returns the figures.

    ``methods`` (keys of METHODS) and ``layers`` (module names) select a subset, for quick runs.
    """
    from ..zoo.digits import DigitsCNN, calibration_inputs, digits_cnn, evaluate, load_digits_data

    out = out if out is not None else sys.stdout
    t_start = time.perf_counter()
    if methods is None:
        chosen = list(METHODS)
    else:
        unknown = [k for k in methods if k not in METHOD_KEYS]
        if unknown:
            raise ValueError(f"unknown demo method(s) {unknown}: choose from {METHOD_KEYS}")
        chosen = [m for m in METHODS if m.key in methods]
    # A method is compared with its baseline, so run the baseline too.
    wanted = {m.key for m in chosen} | {m.baseline for m in chosen if m.baseline}
    chosen = [m for m in METHODS if m.key in wanted]

    # Check the layer names on an untrained model: a typo fails before any training.
    layer_names = list(find_layers(DigitsCNN()))
    if layers is not None:
        unknown = [n for n in layers if n not in layer_names]
        if unknown:
            raise ValueError(f"unknown layer(s) {unknown}: the digits CNN has {layer_names}")
    names = [n for n in layer_names if layers is None or n in layers]

    data = load_digits_data()
    calibration_inputs(calibration_samples, data)  # validates the count before training
    model = digits_cnn(pretrained=True, data=data)
    dense_acc = evaluate(model, data.X_test, data.y_test)
    all_layers = find_layers(model)

    X_cal = calibration_inputs(calibration_samples, data)
    hessians = collect_hessians(model, all_layers, X_cal.split(256))

    runnable = chosen

    print(
        f"digits CNN: {data.X_train.shape[0]} train / {data.X_test.shape[0]} test images, dense test accuracy "
        f"{100 * dense_acc:.1f}%; {calibration_samples} calibration images; {BITS}-bit grids are symmetric "
        f"per-channel min-max; torch threads: {torch.get_num_threads()}",
        file=out,
    )
    print("loss = 1/2 tr(dW H dW^T); 'x baseline' = loss / loss of RTN or magnitude at the same target\n", file=out)

    rows: List[LayerRow] = []
    new_weights: Dict[str, Dict[str, torch.Tensor]] = {m.key: {} for m in runnable}
    skipped: Dict[str, List[str]] = {m.key: [] for m in runnable}
    shapes = {}
    bar = progress_bar(names, desc="layers", unit="layer", progress=progress)
    for name in bar:
        info = all_layers[name]
        mod = info.module
        if info.groups != 1:
            raise ValueError(f"layer {name}: grouped convolutions are not part of this demo")
        W = weight_groups(info)[0]
        H = hessians[name].reshape(info.cols, info.cols)
        shapes[name] = tuple(W.shape)
        ctx = LayerContext(name, W, H, info.taps if info.taps > 1 else None, _fit_grid(W))
        layer_rows = []
        for m in runnable:
            if m.nm and W.shape[1] % 4:
                skipped[m.key].append(name)
                continue
            bar.set_postfix_str(f"{name}: {m.label}")
            t0 = time.perf_counter()
            try:
                Wq = m.run(ctx)
            except Exception as e:
                raise RuntimeError(f"layer {name}, method {m.label}: {e}") from e
            ctx.seconds[m.key] = time.perf_counter() - t0
            seconds = ctx.seconds[m.key] + ctx.extra_seconds.get(m.key, 0.0)
            new_weights[m.key][name] = Wq.reshape(mod.weight.shape).to(mod.weight.dtype)
            layer_rows.append(LayerRow(name, m.key, m.label, layer_loss(W, Wq, H), m.baseline, float("nan"), seconds))
        by_key = {r.method: r for r in layer_rows}
        for r in layer_rows:
            if r.baseline in by_key:
                r.baseline_loss = by_key[r.baseline].loss
        rows.extend(layer_rows)
        bar.write(format_layer_table(name, shapes[name], layer_rows) + "\n", file=out)
    bar.close()

    accuracy = {}
    for m in runnable:
        if not new_weights[m.key]:
            continue
        compressed = copy.deepcopy(model)
        mods = find_layers(compressed)
        with torch.no_grad():
            for name, w in new_weights[m.key].items():
                mods[name].module.weight.copy_(w)
        accuracy[m.key] = evaluate(compressed, data.X_test, data.y_test)

    report = DemoReport(
        dense_accuracy=dense_acc,
        layers=shapes,
        rows=rows,
        accuracy=accuracy,
        skipped={k: v for k, v in skipped.items() if v},
        calibration_samples=calibration_samples,
        seconds=0.0,
    )
    print(format_accuracy_table(report, runnable), file=out)
    report.seconds = time.perf_counter() - t_start
    print(f"\nper-layer comparison finished in {report.seconds:.1f} s", file=out)
    return report
