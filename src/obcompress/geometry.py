"""A layer as the cost models and latency measurements see it: its weight shape as solver
problems and how many output positions one sample gives, and the input shapes that follow.

This module imports nothing of obcompress but its checks: the search (costs) and the formats
(onnxruntime latency) both build on it.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Tuple

from .checks import check_int

__all__ = ["KINDS", "LayerGeometry", "check_geometry", "kernel_shape", "output_shape"]

KINDS = ("linear", "conv1d", "conv2d", "conv1d_hf")


@dataclass(frozen=True)
class LayerGeometry:
    """A layer as the cost models see it.

    ``groups`` x (``rows`` x ``cols``) weights (conv: cols = in_channels/groups x taps);
    ``positions``: output positions per sample, averaged over the calibration data (1 for a
    Linear on vectors, the tokens of a sequence, out_h x out_w of a conv2d).
    """

    name: str
    kind: str
    groups: int
    rows: int
    cols: int
    taps: int = 1
    positions: float = 1.0
    has_bias: bool = False

    @property
    def weights(self) -> int:
        return self.groups * self.rows * self.cols

    @property
    def macs(self) -> float:
        """Dense multiply-accumulates per sample."""
        return self.weights * self.positions

    def as_rows(self, t):
        """A tensor in the layer's weight shape as (groups x rows, cols): one output channel a row,
        groups one after the other (transformers' Conv1D stores its weight as (in, out))."""
        if self.kind == "conv1d_hf":
            return t.t()
        return t.reshape(self.groups * self.rows, self.cols)

    def from_rows(self, t, shape):
        """``as_rows`` undone: back to the weight's own ``shape``."""
        if self.kind == "conv1d_hf":
            return t.t()
        return t.reshape(shape)

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "groups": self.groups, "rows": self.rows,
                "cols": self.cols, "taps": self.taps, "positions": self.positions, "has_bias": self.has_bias}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LayerGeometry":
        return cls(**{k: d[k] for k in ("name", "kind", "groups", "rows", "cols", "taps", "positions", "has_bias")})


def check_geometry(geom: Any) -> LayerGeometry:
    """``geom`` itself, after checking it describes a layer (ValueError naming it otherwise)."""
    if not isinstance(geom, LayerGeometry):
        raise ValueError(f"a cost needs a LayerGeometry, got {type(geom).__name__}")
    where = f"layer {geom.name!r}"
    if geom.kind not in KINDS:
        raise ValueError(f"{where}: unknown layer kind {geom.kind!r} (expected one of {KINDS})")
    for key in ("groups", "rows", "cols", "taps"):
        check_int(getattr(geom, key), f"{where}: {key}")
    if geom.cols % geom.taps:
        raise ValueError(f"{where}: {geom.cols} columns are not a whole number of input channels x {geom.taps} taps")
    p = geom.positions
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not math.isfinite(p) or p <= 0:
        raise ValueError(f"{where}: positions must be a finite number > 0, got {p!r}")
    return geom


def kernel_shape(geom: LayerGeometry) -> Tuple[int, ...]:
    """A conv's kernel: the geometry keeps the tap count, not the kernel's shape, so a square kernel
    where the count is a square (3x3, 5x5), else one row of taps. Either is the same MACs and the
    same im2col size."""
    if geom.kind == "conv1d":
        return (geom.taps,)
    k = math.isqrt(geom.taps)
    return (k, k) if k * k == geom.taps else (1, geom.taps)


def output_shape(geom: LayerGeometry) -> Tuple[int, ...]:
    """Output size per sample with stride 1 and "same" padding: positions tokens for a linear, a
    length for conv1d, the square side whose area is nearest to positions for conv2d."""
    p = float(geom.positions)
    if geom.kind == "conv2d":
        side = max(1, round(math.sqrt(p)))
        return (side, side)
    return (max(1, round(p)),)
