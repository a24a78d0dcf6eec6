"""Uniform quantization grids: 2..8 bits, symmetric or asymmetric, per tensor / channel (row) / group.

A grid maps a real weight x of row r, column c to
    code = clamp(round(x / scale[r, g(c)]) + zero[r, g(c)], 0, 2^bits - 1),   x_hat = scale * (code - zero)
with g(c) = c // group_size for the group strategy. The min-max grid follows the reference quantizer
(symmetric: scale = 2 max|x| / (2^b - 1), zero = 2^(b-1)); ``mse=True`` shrinks the range by a grid
search minimising sum |x - x_hat|^2.4 (the reference's p-norm clip search).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..checks import check_bits, check_group_size
from ._common import check_weight

STRATEGIES = ("tensor", "channel", "group")


def minmax_params(
    x: torch.Tensor,
    bits: int,
    symmetric: bool = True,
    mse: bool = False,
    norm: float = 2.4,
    grid_points: int = 100,
    max_shrink: float = 0.8,
):
    """Scale and zero point for each row of ``x`` (rows x n): returns two float tensors of shape (rows,)."""
    maxq = 2**bits - 1
    x = x.to(torch.float32)
    xmin = torch.clamp(x.min(dim=1).values, max=0)
    xmax = torch.clamp(x.max(dim=1).values, min=0)
    if symmetric:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(empty, torch.full_like(xmax, 1.0), xmax)

    def params(lo, hi):
        scale = (hi - lo) / maxq
        if symmetric:
            zero = torch.full_like(scale, (maxq + 1) / 2)
        else:
            zero = torch.round(-lo / scale)
        return scale, zero

    scale, zero = params(xmin, xmax)
    if mse:
        best = torch.full_like(scale, float("inf"))
        for i in range(int(max_shrink * grid_points)):
            p = 1 - i / grid_points
            s1, z1 = params(p * xmin, p * xmax)
            q = _fake_quant(x, s1[:, None], z1[:, None], maxq)
            err = (q - x).abs().pow(norm).sum(dim=1)
            better = err < best
            best = torch.where(better, err, best)
            scale = torch.where(better, s1, scale)
            zero = torch.where(better, z1, zero)
    return scale, zero


def _fake_quant(x, scale, zero, maxq):
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return scale * (q - zero)


@dataclass
class QuantGrid:
    """A fitted grid. ``scale``/``zero`` have shape (rows, groups) (tensor: (1, 1); channel: (rows, 1))."""

    bits: int
    scale: torch.Tensor
    zero: torch.Tensor
    symmetric: bool = True
    strategy: str = "channel"
    group_size: Optional[int] = None
    mse: bool = False
    # Group of each column when groups are not runs of consecutive columns (GPTQ with act-order
    # forms groups in its permuted order); None means column c is in group c // group_size.
    g_idx: Optional[torch.Tensor] = None

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    @classmethod
    def fit(
        cls,
        W: torch.Tensor,
        bits: int,
        symmetric: bool = True,
        strategy: str = "channel",
        group_size: Optional[int] = None,
        mse: bool = False,
    ) -> "QuantGrid":
        check_weight(W)
        check_bits(bits)
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown quantization strategy {strategy!r}: use one of {STRATEGIES}")
        rows, cols = W.shape
        Wf = W.detach().to(torch.float32)
        if strategy == "tensor":
            s, z = minmax_params(Wf.reshape(1, -1), bits, symmetric, mse)
            return cls(bits, s.reshape(1, 1), z.reshape(1, 1), symmetric, strategy, None, mse)
        if strategy == "channel":
            s, z = minmax_params(Wf, bits, symmetric, mse)
            return cls(bits, s[:, None], z[:, None], symmetric, strategy, None, mse)
        group_size = check_group_size(group_size)
        ng = math.ceil(cols / group_size)
        scale = torch.empty(rows, ng, dtype=torch.float32, device=W.device)
        zero = torch.empty_like(scale)
        for g in range(ng):
            s, z = minmax_params(Wf[:, g * group_size : (g + 1) * group_size], bits, symmetric, mse)
            scale[:, g], zero[:, g] = s, z
        return cls(bits, scale, zero, symmetric, strategy, group_size, mse)

    def column_groups(self, cols: int, device=None) -> torch.Tensor:
        """Index into the group dimension of ``scale`` for each column."""
        c = torch.arange(cols, device=device if device is not None else self.scale.device)
        if self.g_idx is not None:
            return self.g_idx.to(c.device)
        if self.strategy == "group":
            return c // self.group_size
        return torch.zeros_like(c)

    def expand(self, rows: int, cols: int):
        """Scale and zero of every weight position: two (rows, cols) float32 tensors."""
        g = self.column_groups(cols)
        s = self.scale[:, g].expand(rows, cols)
        z = self.zero[:, g].expand(rows, cols)
        return s.contiguous(), z.contiguous()

    def _check_shape(self, W: torch.Tensor) -> None:
        if W.dim() != 2:
            raise ValueError(f"grid expects a 2-D weight, got shape {tuple(W.shape)}")
        rows, cols = W.shape
        if self.scale.dim() != 2 or self.zero.shape != self.scale.shape:
            raise ValueError(f"grid scale/zero must be 2-D of equal shape, got {tuple(self.scale.shape)} "
                             f"and {tuple(self.zero.shape)}")
        if self.strategy != "tensor" and self.scale.shape[0] != rows:
            raise ValueError(f"grid fitted for {self.scale.shape[0]} rows, weight has {rows}")
        if self.g_idx is not None:
            if self.g_idx.numel() != cols:
                raise ValueError(f"grid has a group index for {self.g_idx.numel()} columns, weight has {cols}")
        elif self.strategy == "group":
            if not self.group_size or math.ceil(cols / self.group_size) != self.scale.shape[1]:
                raise ValueError(f"grid fitted for {self.scale.shape[1]} groups of {self.group_size}, "
                                 f"weight has {cols} columns")
        elif self.scale.shape[1] != 1:
            raise ValueError(f"grid with strategy {self.strategy!r} must have one scale per row, "
                             f"got shape {tuple(self.scale.shape)}")

    def encode(self, W: torch.Tensor) -> torch.Tensor:
        """Integer codes in 0..2^bits-1 (uint8) of the nearest grid points."""
        self._check_shape(W)
        s, z = self.expand(*W.shape)
        return torch.clamp(torch.round(W.to(torch.float32) / s) + z, 0, self.maxq).to(torch.uint8)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        self._check_shape(codes)
        s, z = self.expand(*codes.shape)
        return s * (codes.to(torch.float32) - z)

    def quantize(self, W: torch.Tensor) -> torch.Tensor:
        """Round W to the nearest grid point (returned in W's dtype)."""
        return self.decode(self.encode(W)).to(W.dtype)

    def to(self, device) -> "QuantGrid":
        g_idx = None if self.g_idx is None else self.g_idx.to(device)
        return QuantGrid(self.bits, self.scale.to(device), self.zero.to(device), self.symmetric, self.strategy,
                         self.group_size, self.mse, g_idx)


def check_grid(grid, W: torch.Tensor) -> None:
    """ValueError unless ``grid`` is a QuantGrid that fits W's rows, columns and groups."""
    if not isinstance(grid, QuantGrid):
        raise ValueError(f"grid must be a QuantGrid (see QuantGrid.fit), got {type(grid).__name__}")
    try:
        grid._check_shape(W)
    except ValueError as e:
        raise ValueError(f"grid does not fit W of shape {tuple(W.shape)}: {e}") from None
