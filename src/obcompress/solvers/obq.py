"""OBQ: exact greedy quantization, one weight at a time, the rest of the row re-fitted (OBC).

The grid is fixed beforehand (from the original row); at each step every row quantizes the weight
whose rounding raises the layer loss least, and its other unquantized weights absorb the error
through the OBS update. With a mask (joint OBC), pruned weights are zero and stay zero: each row is
first re-fitted on its kept weights, then quantized on that support.
"""

from __future__ import annotations

import time
from typing import Optional

import torch

from ._common import SolverResult, layer_loss, prepare_layer
from ._elimination import QuantPolicy, greedy_single, refit_on_support
from .grid import QuantGrid, check_grid


def _check_mask(mask, W):
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.shape != W.shape:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a bool tensor of W's shape {tuple(W.shape)}, got {shape}")
    return mask.to(device=W.device, dtype=torch.bool)


def obq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    grid: QuantGrid,
    mask: Optional[torch.Tensor] = None,
    damp="auto",
    dtype: torch.dtype = torch.float32,
    refit: Optional[torch.Tensor] = None,
) -> SolverResult:
    """Exact greedy OBQ of one layer on ``grid``; with ``mask`` (True = kept), joint OBC.

    ``refit``: the least-squares re-fit of W on ``mask`` (``support_refit(W, H, mask)``), when the
    caller already has it, e.g. to quantize one support at several bit widths; it must come from
    the same W, H and damp."""
    t0 = time.perf_counter()
    prep = prepare_layer(W, H, damp)
    check_grid(grid, W)
    keep = _check_mask(mask, W)
    rows, cols = W.shape
    W0 = prep.W
    prune_loss = 0.0
    if refit is not None and (keep is None or tuple(refit.shape) != tuple(W.shape)):
        raise ValueError(f"refit must be the {tuple(W.shape)} re-fit of W on a mask, and needs the mask")
    if keep is not None:
        if refit is not None:
            W0 = refit.to(torch.float64).clone()
        else:
            W0 = refit_on_support(W0, prep.H, prep.Hinv, keep, fast=dtype == torch.float32)
        # The re-fit is the H-projection onto the support, so the losses of the two stages add up.
        prune_loss = layer_loss(prep.W, W0, prep.H)
    scale, zero = grid.expand(rows, cols)
    extras = {"scale": scale.to(dtype), "zero": zero.to(dtype)}
    traj = greedy_single(W0, prep.H, prep.Hinv, QuantPolicy(grid.maxq), keep=keep, dtype=dtype,
                         extras=extras, record_values=True)
    Q = traj.values
    if keep is not None:
        Q = torch.where(keep, Q, torch.zeros((), dtype=Q.dtype))
    # The frozen values are grid points computed in the loop's precision; snap them exactly.
    Q = grid.quantize(Q.to(torch.float32)).to(torch.float64)
    if keep is not None:
        Q = torch.where(keep, Q, torch.zeros((), dtype=Q.dtype))
    weight = Q.to(W.dtype)
    valid = traj.order >= 0
    return SolverResult(
        weight=weight,
        loss=layer_loss(W, weight, H),
        mask=keep,
        grid=grid,
        method="obq",
        damp=prep.damp,
        seconds=time.perf_counter() - t0,
        info={"predicted_loss": prune_loss + float(traj.losses[valid].sum()), "joint": keep is not None},
    )


def support_refit(W: torch.Tensor, H: torch.Tensor, mask: torch.Tensor, damp="auto",
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The least-squares re-fit of every row of W with its pruned weights (mask False) at zero,
    w.r.t. H dampened as ``obq_quantize`` would (float64): what joint OBC starts from."""
    prep = prepare_layer(W, H, damp)
    keep = _check_mask(mask, W)
    if keep is None:
        raise ValueError("support_refit needs a mask")
    return refit_on_support(prep.W, prep.H, prep.Hinv, keep, fast=dtype == torch.float32)
