"""Report figures of a non-uniform search: accuracy-vs-budget Pareto curves and per-layer choices.

matplotlib is imported inside the functions, so importing obcompress never needs it. Figures are
drawn on an Agg canvas of their own rather than through pyplot, so nothing here touches the
caller's global backend or figure state. PNGs are written to a temporary file beside the target
and moved into place, so a reader never sees a half-written image.
"""

from __future__ import annotations

import math
import os
import textwrap
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple, Union

from ..files import atomic_path

__all__ = ["pareto_plot", "layer_chart"]

PathLike = Union[str, "os.PathLike[str]"]

# Drawn where a layer keeps float weights, so the bits axis has somewhere to put it.
FLOAT_BITS = 32


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("plots need matplotlib: pip install matplotlib") from None
    return Figure, FigureCanvasAgg


def _save(fig: Any, canvas_cls: Any, path: PathLike, dpi: int) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"the plot path must end in .png, got {str(path)!r}")
    canvas_cls(fig)
    # Laid out here, for every figure: wide tick labels (a linear axis of small numbers) would
    # otherwise push an axis label off the edge in a caller that never asked for a layout.
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path


def _finite(value: Any, what: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise ValueError(f"{what} must be finite, got {out}")
    return out


def _points(series: Mapping[str, Sequence[Tuple[float, float]]]):
    curves = []
    for name, points in series.items():
        try:
            pts = list(points)
        except TypeError:
            raise ValueError(f"series {name!r} must be a sequence of (x, y) points") from None
        if not pts:
            raise ValueError(f"series {name!r} has no points")
        xy = []
        for i, p in enumerate(pts):
            try:
                n = len(p)
            except TypeError:
                n = -1
            if n != 2:
                raise ValueError(f"series {name!r} point {i} must be an (x, y) pair, got {p!r}")
            xy.append((_finite(p[0], f"series {name!r} point {i} x"),
                       _finite(p[1], f"series {name!r} point {i} y")))
        xy.sort(key=lambda t: t[0])
        curves.append((str(name), xy))
    return curves


def pareto_plot(series: Mapping[str, Sequence[Tuple[float, float]]], path: PathLike, *,
                xlabel: str, ylabel: str, title: Optional[str] = None,
                dense: Optional[float] = None, dpi: int = 120,
                others: Optional[Mapping[str, Sequence[Tuple[float, float]]]] = None,
                others_label: str = "other runs",
                top_axis: Optional[Tuple[str, Callable[[float], float]]] = None) -> Path:
    """Plot accuracy against budget, one line with markers per method; write a PNG; return its path.

    ``series`` maps a method name ("uniform", "DP", "SPDY", ...) to its (x, y) points, x the budget
    (e.g. "BOPs reduction (x)") and y the accuracy; points are drawn in order of x. ``dense`` adds a
    dashed horizontal line at the uncompressed accuracy. ``others``: more points per method, drawn
    as hollow markers in the method's colour and not joined (e.g. configurations aimed at another
    budget), with one legend entry ``others_label``. ``top_axis``: (label, f) adds a top axis whose
    tick at x reads f(x) (e.g. the whole model's reduction at a searched-layer reduction).
    """
    if not isinstance(series, Mapping) or len(series) == 0:
        raise ValueError("series must be a non-empty mapping of method name -> (x, y) points")
    curves = _points(series)
    extra = dict(_points(others)) if others else {}
    if dense is not None:
        dense = _finite(dense, "dense")

    Figure, Canvas = _matplotlib()
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot(1, 1, 1)
    markers = "osD^vP*X"
    names = [n for n, _ in curves] + [n for n in extra if n not in dict(curves)]
    for k, name in enumerate(names):
        color = f"C{k % 10}"
        xy = dict(curves).get(name)
        if xy:
            ax.plot([x for x, _ in xy], [y for _, y in xy], marker=markers[k % len(markers)], color=color,
                    label=name, linewidth=1.6, markersize=5)
        if name in extra:
            ax.plot([x for x, _ in extra[name]], [y for _, y in extra[name]], linestyle="none", color=color,
                    marker=markers[k % len(markers)], markersize=6, markerfacecolor="none", gid="others",
                    label=None if xy else name)
    if extra:
        ax.plot([], [], linestyle="none", marker="o", markerfacecolor="none", color="0.35", label=others_label)
    if dense is not None:
        ax.axhline(dense, color="0.35", linestyle="--", linewidth=1.0, label="dense")
    if top_axis is not None:
        from matplotlib.ticker import FuncFormatter

        label, f = top_axis
        top = ax.secondary_xaxis("top")
        top.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{f(x):.3g}" if x > 0 else ""))
        top.set_xlabel(label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _save(fig, Canvas, path, dpi)


def layer_chart(names: Sequence[str], sparsity: Sequence[float], bits: Sequence[Optional[int]],
                path: PathLike, *, title: Optional[str] = None, dpi: int = 120) -> Path:
    """Draw the per-layer choice of a recipe: sparsity (top) and weight bits (bottom); write a PNG.

    ``sparsity`` is the pruned fraction in [0, 1]; ``bits[l]`` is None for a layer left in float,
    drawn as a 32-bit bar labelled "float". The figure widens with the layer count so ~50 names,
    rotated, stay readable. Returns the path.
    """
    names, sparsity, bits = list(names), list(sparsity), list(bits)
    if not names:
        raise ValueError("layer_chart needs at least one layer")
    if not (len(names) == len(sparsity) == len(bits)):
        raise ValueError(
            f"names, sparsity and bits must have one entry per layer; got {len(names)}, "
            f"{len(sparsity)} and {len(bits)}"
        )
    sp = []
    for l, s in enumerate(sparsity):
        v = _finite(s, f"sparsity of layer {l} ({names[l]})")
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"sparsity of layer {l} ({names[l]}) must be in [0, 1], got {v}")
        sp.append(v)
    bt = []
    for l, b in enumerate(bits):
        if b is None:
            bt.append(None)
            continue
        try:
            ok = not isinstance(b, bool) and int(b) == b and 1 <= int(b) <= FLOAT_BITS
        except (TypeError, ValueError, OverflowError):
            ok = False
        if not ok:
            raise ValueError(f"bits of layer {l} ({names[l]}) must be an integer in 1..32 or None, got {b!r}")
        bt.append(int(b))

    Figure, Canvas = _matplotlib()
    n = len(names)
    longest = max(len(str(x)) for x in names)
    fontsize = 8 if n <= 60 else 6
    # Width per bar keeps rotated labels from overlapping; height leaves room for long names.
    width = max(6.0, 0.24 * n + 1.5)
    height = 5.0 + min(3.0, 0.07 * longest)
    fig = Figure(figsize=(width, height))
    ax_s, ax_b = fig.subplots(2, 1, sharex=True)
    xs = list(range(n))

    ax_s.bar(xs, [100.0 * v for v in sp], color="tab:blue")
    ax_s.set_ylabel("sparsity (%)")
    ax_s.set_ylim(0, 100)
    ax_s.grid(True, axis="y", alpha=0.3)

    heights = [FLOAT_BITS if b is None else b for b in bt]
    colors = ["0.7" if b is None else "tab:orange" for b in bt]
    ax_b.bar(xs, heights, color=colors)
    ax_b.set_yscale("log", base=2)
    ticks = sorted(set(heights))
    ax_b.set_yticks(ticks)
    ax_b.set_yticklabels(["float" if t == FLOAT_BITS and None in bt else str(t) for t in ticks])
    ax_b.minorticks_off()
    ax_b.set_ylabel("weight bits")
    ax_b.grid(True, axis="y", alpha=0.3)

    ax_b.set_xticks(xs)
    ax_b.set_xticklabels([str(x) for x in names], rotation=90, fontsize=fontsize)
    ax_b.set_xlim(-0.6, n - 0.4)
    if title:
        # Wrapped to the figure's width (about 10 characters of title per inch): a long title
        # would run off both edges, whatever the layout does.
        ax_s.set_title(textwrap.fill(str(title), width=max(40, int(10 * width))))
    fig.tight_layout()
    return _save(fig, Canvas, path, dpi)
