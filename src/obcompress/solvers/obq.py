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

from ._common import (
    FLOAT32_MAX_GROWTH_VALUES,
    SolverResult,
    drifted_rows,
    layer_loss,
    loop_dtype,
    prepare_layer,
    row_losses,
    serial_sum,
)
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
    dtype="auto",
    refit: Optional[torch.Tensor] = None,
) -> SolverResult:
    """Exact greedy OBQ of one layer on ``grid``; with ``mask`` (True = kept), joint OBC.

    ``dtype``: the greedy loop's precision, "auto" (float32, or float64 where H's diagonal growth
    would cost float32 its digits: ``_common.FLOAT32_MAX_GROWTH_VALUES``), or a torch dtype.
    Whatever ran, every row is checked: a float32 row whose float64-measured loss disagrees with
    the loop's own step losses has drifted and is solved again in float64, and a row that still
    loses to round-to-nearest on the same grid (from the same, re-fitted, weights) is rounded
    instead. ``info`` says how many rows took each path (``float64_rows``, ``rtn_rows``).

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
    loop = loop_dtype(dtype, prep, FLOAT32_MAX_GROWTH_VALUES)
    if refit is not None and (keep is None or tuple(refit.shape) != tuple(W.shape)):
        raise ValueError(f"refit must be the {tuple(W.shape)} re-fit of W on a mask, and needs the mask")
    if keep is not None:
        if refit is not None:
            W0 = refit.to(torch.float64).clone()
        else:
            W0 = refit_on_support(W0, prep.H, prep.Hinv, keep, fast=loop == torch.float32)
        # The re-fit is the H-projection onto the support, so the losses of the two stages add up.
        prune_loss = layer_loss(prep.W, W0, prep.H)
    scale, zero = grid.expand(rows, cols)

    def solve(sel, precision):
        """Greedy values and per-row predicted losses of the rows ``sel`` (None: all)."""
        w0 = W0 if sel is None else W0[sel]
        k = keep if keep is None or sel is None else keep[sel]
        s, z = (scale, zero) if sel is None else (scale[sel], zero[sel])
        traj = greedy_single(w0, prep.H, prep.Hinv, QuantPolicy(grid.maxq), keep=k, dtype=precision,
                             extras={"scale": s.to(precision), "zero": z.to(precision)}, record_values=True)
        predicted = torch.where(traj.order >= 0, traj.losses, torch.zeros((), dtype=torch.float64)).sum(1)
        engines.add(traj.engine)
        return traj.values, predicted

    engines = set()
    Q, predicted = solve(None, loop)
    Q = _snap(Q, grid, keep)
    float64_rows = 0
    if loop == torch.float32:
        redo = torch.nonzero(drifted_rows(W0, Q, prep.H, predicted)).flatten()
        if redo.numel():
            Q[redo], predicted[redo] = solve(redo, torch.float64)
            Q = _snap(Q, grid, keep)
            float64_rows = int(redo.numel())
    # The float64 loop can drift too (an H near float64's own limits with damp=0): whatever the
    # cause, no row is left worse than rounding.
    rtn = _snap(W0, grid, keep)
    worse = row_losses(W, rtn, H) < row_losses(W, Q, H)
    if bool(worse.any()):
        Q[worse] = rtn[worse]
        predicted[worse] = row_losses(W0[worse], rtn[worse], prep.H)
    weight = Q.to(W.dtype)
    return SolverResult(
        weight=weight,
        loss=layer_loss(W, weight, H),
        mask=keep,
        grid=grid,
        method="obq",
        damp=prep.damp,
        seconds=time.perf_counter() - t0,
        info={"predicted_loss": prune_loss + serial_sum(predicted), "joint": keep is not None,
              "loop_dtype": str(loop).replace("torch.", ""), "float64_rows": float64_rows,
              "rtn_rows": int(worse.sum()), "engine": "+".join(sorted(engines))},
    )


def _snap(values: torch.Tensor, grid: QuantGrid, keep: Optional[torch.Tensor]) -> torch.Tensor:
    """Values on the grid exactly (float64), pruned weights at zero: the loop freezes grid points
    in its own precision, and RTN rounds with the same call."""
    Q = grid.quantize(values.to(torch.float32)).to(torch.float64)
    if keep is not None:
        Q = torch.where(keep, Q, torch.zeros((), dtype=Q.dtype))
    return Q


def support_refit(W: torch.Tensor, H: torch.Tensor, mask: torch.Tensor, damp="auto",
                  dtype="auto") -> torch.Tensor:
    """The least-squares re-fit of every row of W with its pruned weights (mask False) at zero,
    w.r.t. H dampened as ``obq_quantize`` would (float64): what joint OBC starts from."""
    prep = prepare_layer(W, H, damp)
    keep = _check_mask(mask, W)
    if keep is None:
        raise ValueError("support_refit needs a mask")
    fast = loop_dtype(dtype, prep, FLOAT32_MAX_GROWTH_VALUES) == torch.float32
    return refit_on_support(prep.W, prep.H, prep.Hinv, keep, fast=fast)
