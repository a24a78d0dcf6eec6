"""Data-free baselines: magnitude pruning and round-to-nearest quantization.

They ignore H except to report the layer loss, which makes them the yardstick the OBS solvers are
measured against (same loss definition, same count rules, same mask structures).
"""

from __future__ import annotations

import time
from typing import Optional

import torch

from ._common import (
    SolverResult,
    check_hessian,
    check_weight,
    columns_last_perm,
    layer_loss,
    num_pruned,
    parse_mask_structure,
    resolve_sparsity,
    undo_column_perm,
)
from .grid import QuantGrid, check_grid


def _smallest_first(scores: torch.Tensor) -> torch.Tensor:
    # A stable sort makes ties go to the lower flat index, so equal inputs give equal masks.
    return torch.sort(scores.flatten(), stable=True).indices


def magnitude_prune(
    W: torch.Tensor,
    sparsity: Optional[float] = None,
    mask_structure: str = "unstructured",
    *,
    H: Optional[torch.Tensor] = None,
    columns_last: Optional[int] = None,
) -> SolverResult:
    """Zero the smallest-magnitude weights.

    unstructured: exactly ``num_pruned(sparsity, W.numel())`` weights over the whole layer.
    "N:M": keep the N largest |w| of every M consecutive columns (after the ``columns_last``
    reordering, if given). "block:c": drop ``num_pruned(sparsity, blocks)`` runs of c consecutive
    columns of a row with the smallest L2 norm. Ties go to the lower index.
    """
    t0 = time.perf_counter()
    check_weight(W)
    rows, cols = W.shape
    ms = parse_mask_structure(mask_structure, cols)
    if H is not None:
        check_hessian(H, cols)
    sp = resolve_sparsity(sparsity, ms)
    # Validated for every structure; unstructured selection does not depend on column order.
    perm = columns_last_perm(cols, columns_last, device=W.device)
    absW = W.detach().abs()

    if ms.kind == "unstructured":
        k = num_pruned(sp, W.numel())
        keep = torch.ones(W.numel(), dtype=torch.bool, device=W.device)
        keep[_smallest_first(absW)[:k]] = False
        mask = keep.reshape(rows, cols)
    else:
        A = absW if perm is None else absW[:, perm]
        if ms.kind == "nm":
            groups = A.reshape(rows, cols // ms.m, ms.m)
            order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
            keep = torch.zeros_like(groups, dtype=torch.bool)
            keep.scatter_(-1, order[..., : ms.n], True)
        else:
            blocks = A.to(torch.float64).reshape(rows, cols // ms.block, ms.block)
            norms = blocks.pow(2).sum(dim=-1)
            k = num_pruned(sp, norms.numel())
            kb = torch.ones(norms.numel(), dtype=torch.bool, device=W.device)
            kb[_smallest_first(norms)[:k]] = False
            keep = kb.reshape(rows, -1, 1).expand(rows, cols // ms.block, ms.block)
        keep = keep.reshape(rows, cols)
        mask = undo_column_perm(keep, perm)

    weight = W.detach().masked_fill(~mask, 0)
    loss = layer_loss(W, weight, H) if H is not None else float("nan")
    return SolverResult(
        weight=weight,
        loss=loss,
        mask=mask,
        method="magnitude",
        seconds=time.perf_counter() - t0,
        info={"mask_structure": str(ms), "sparsity": sp, "columns_last": columns_last},
    )


def rtn_quantize(W: torch.Tensor, grid: QuantGrid, *, H: Optional[torch.Tensor] = None) -> SolverResult:
    """Round every weight to the nearest point of ``grid`` (no error compensation)."""
    t0 = time.perf_counter()
    check_weight(W)
    check_grid(grid, W)
    if H is not None:
        check_hessian(H, W.shape[1])
    if grid.scale.device != W.device:
        grid = grid.to(W.device)
    weight = grid.quantize(W.detach())
    loss = layer_loss(W, weight, H) if H is not None else float("nan")
    return SolverResult(
        weight=weight,
        loss=loss,
        grid=grid,
        method="rtn",
        seconds=time.perf_counter() - t0,
        info={"bits": grid.bits, "strategy": grid.strategy},
    )
