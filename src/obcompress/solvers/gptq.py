"""Fixed-order lazy-batch solvers: GPTQ (quantization) and SparseGPT (pruning, optionally quantized).

Both walk the columns once, in one order shared by all rows. With U the upper Cholesky factor of
H^-1 (H^-1 = U^T U), fixing column j to a target t_j moves the not-yet-fixed columns k > j by
    w_k -= (w_j - t_j) / U_jj * U_jk,
which is the OBS update restricted to the remaining coordinates: U_jj * U[j, :] is row j of the H^-1
left after eliminating columns 0..j-1, whose diagonal entry is U_jj^2. Updates are applied eagerly
inside a block of columns and lazily, as one GEMM, to the columns after the block.

``SolverResult.seconds`` is the solve alone; the float64 evaluation of ``loss`` is not included.

Layout: the working weights are kept transposed (cols x rows), so that each column is a contiguous
vector and one column step is a handful of vector ops plus one rank-1 update over all rows.
"""

from __future__ import annotations

import time
from typing import List, Optional, Tuple

import torch

from ..checks import check_group_size, check_int
from ._common import (
    SolverResult,
    check_hessian,
    check_weight,
    columns_last_perm,
    layer_loss,
    num_pruned,
    parse_mask_structure,
    prepare_layer,
    resolve_sparsity,
    undo_column_perm,
)
from .grid import QuantGrid, check_grid, minmax_params

__all__ = ["gptq_quantize", "sparsegpt_prune"]


# ----------------------------------------------------------------------------------------------
# shared pieces


def _check_dtype(dtype) -> None:
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")


def _block_bounds(cols: int, block_size: int, unit: Optional[int]) -> List[Tuple[int, int]]:
    """Blocks of at most ``block_size`` columns, cut so that no run of ``unit`` columns (a quantization
    group or an N:M group, starting at multiples of ``unit``) begins inside a block and ends after it.

    A group is then either inside one block, where eager updates keep all its columns current, or
    starts a block, where the lazy updates of all earlier blocks have been applied: either way the
    decisions taken at the group's start see fully updated weights, whatever the block size.
    """
    bounds = []
    i1 = 0
    while i1 < cols:
        i2 = min(i1 + block_size, cols)
        if unit is not None and i2 < cols:
            start = (i2 - 1) // unit * unit
            if start > i1 and start + unit > i2:
                i2 = start
        bounds.append((i1, i2))
        i1 = i2
    return bounds


def _check_shapes(W, H) -> None:
    # Type and shape only: prepare_layer checks the values (finite, diagonal) of the permuted copies.
    if not isinstance(W, torch.Tensor) or W.dim() != 2 or W.numel() == 0 or not W.is_floating_point():
        check_weight(W)
    cols = W.shape[1]
    if not isinstance(H, torch.Tensor) or tuple(H.shape) != (cols, cols):
        check_hessian(H, cols)


def _tril_inverse(L: torch.Tensor, base: int = 128) -> torch.Tensor:
    """Inverse of a lower-triangular matrix by 2x2 block recursion: [[A, 0], [C, D]]^-1 has the
    blocks A^-1, D^-1 and -D^-1 C A^-1, so all but the small leaves is GEMM work (n^3/3 flops,
    against n^3 for a triangular solve with the identity as right-hand side)."""
    n = L.shape[0]
    if n <= base:
        eye = torch.eye(n, dtype=L.dtype, device=L.device)
        return torch.linalg.solve_triangular(L, eye, upper=False)
    h = n // 2
    out = torch.zeros_like(L)
    out[:h, :h] = _tril_inverse(L[:h, :h], base)
    out[h:, h:] = _tril_inverse(L[h:, h:], base)
    torch.mm(out[h:, h:], L[h:, :h] @ out[:h, :h], out=out[h:, :h])
    out[h:, :h].neg_()
    return out


def _inverse_upper_factor(prep) -> torch.Tensor:
    """U with U^T U = H_p^-1, upper triangular, for a layer prepared in *reversed* processing order.

    With J the reversal and M the lower Cholesky factor of prep.H = J H_p J, H_p = (J M J)(J M J)^T
    with J M J upper, so U = J M^-1 J: one triangular inverse of the factor prepare_layer already has.
    When prepare_layer has formed H^-1 anyway, one Cholesky factorization of it is cheaper.
    """
    if prep.Hinv is None:
        return _tril_inverse(prep.L).flip(0, 1)
    U, info = torch.linalg.cholesky_ex(prep.Hinv.flip(0, 1), upper=True)
    if int(info) != 0:
        return _tril_inverse(prep.L).flip(0, 1)
    return U


def _prepare_in_order(W: torch.Tensor, H: torch.Tensor, order: Optional[torch.Tensor], damp):
    """Prepare the layer with its columns in processing ``order`` (None: natural) and return
    (PreparedLayer of the reversed order, W in processing order (float64, dead columns zeroed),
    U: the upper Cholesky factor of H^-1 in processing order, float64)."""
    _check_shapes(W, H)
    if H.device != W.device:
        H = H.to(W.device)
    if order is None:
        Wr, Hr = W.flip(1), H.flip(0, 1)
    else:
        rev = order.flip(0)
        Wr, Hr = W[:, rev], H[rev][:, rev]
    prep = prepare_layer(Wr, Hr, damp, inverse=False, serial=False)
    return prep, prep.W.flip(1), _inverse_upper_factor(prep)


def _grid_params(grid: QuantGrid, rows: int, cols: int, dtype, device):
    """Per-group (scale, low, high) row vectors in the loop dtype, and each column's group index.

    q(w) = scale * clamp(round(w / scale), -zero, maxq - zero) is the grid's rounding, since zero is
    an integer: clamping the shifted code is the same as shifting the clamped one.
    """
    scale = grid.scale.to(device=device, dtype=dtype).expand(rows, -1)
    zero = grid.zero.to(device=device, dtype=dtype).expand(rows, -1)
    params = [(scale[:, g].contiguous(), (-zero[:, g]).contiguous(), (grid.maxq - zero[:, g]).contiguous())
              for g in range(scale.shape[1])]
    col_group = grid.column_groups(cols).tolist()
    return params, col_group


def _finish_quantized(Q: torch.Tensor, grid: QuantGrid, dtype) -> torch.Tensor:
    # In float32 the loop's s * k already is the grid's own float32 value; a float64 loop's s * k is
    # exact and must be rounded to it so that grid.quantize(weight) == weight.
    if dtype != torch.float32:
        Q = grid.quantize(Q.to(torch.float32))
    return Q


# ----------------------------------------------------------------------------------------------
# GPTQ


@torch.no_grad()
def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    grid: QuantGrid,
    block_size: int = 128,
    act_order: bool = False,
    group_size: Optional[int] = None,
    static_groups: bool = False,
    damp=0.01,
    dtype=torch.float32,
) -> SolverResult:
    """Quantize W (rows x cols) onto ``grid`` column by column with GPTQ's error feedback.

    ``act_order`` processes columns by descending diag(H). With ``group_size`` (or a grid whose
    strategy is "group") the grid is re-fitted every ``group_size`` processed columns from the current
    weights, with the grid's bits / symmetric / mse settings; ``static_groups`` fits all groups from
    the original W instead (groups of consecutive original columns). The returned ``.grid`` reproduces
    the weight exactly: ``result.grid.quantize(result.weight) == result.weight`` (for a float32 W).
    ``dtype`` is the precision of the column loop; H is always factored in float64.
    """
    t0 = time.perf_counter()
    if not isinstance(grid, QuantGrid):
        check_grid(grid, W)
    check_int(block_size, "block_size")
    _check_dtype(dtype)
    if group_size is None and grid.strategy == "group" and grid.g_idx is None:
        group_size = grid.group_size
    if group_size is not None:
        check_group_size(group_size)
    _check_shapes(W, H)
    if group_size is None:
        check_grid(grid, W)
    rows, cols = W.shape
    device = W.device

    perm = None
    if act_order:
        # dead inputs count with the diagonal 1 they get in prepare_layer
        dH = torch.diagonal(H).to(device=device, dtype=torch.float64)
        dH = torch.where(dH == 0, torch.ones_like(dH), dH)
        perm = torch.argsort(dH, descending=True, stable=True)
    prep, Wp, U = _prepare_in_order(W, H, perm, damp)
    # Row j of U scaled to a unit diagonal: how later columns move per unit of raw error w_j - t_j.
    V = U.to(dtype)
    V.mul_((1.0 / torch.diagonal(U)).to(dtype)[:, None])
    del U

    WT = torch.empty(cols, rows, dtype=dtype, device=device)
    WT.copy_(Wp.t())  # (cols, rows), processing order

    dynamic = group_size is not None and not static_groups
    if group_size is None:
        out_grid = grid
        params, col_group = _grid_params(grid, rows, cols, dtype, device)
        if perm is not None:
            col_group = [col_group[c] for c in perm.tolist()]
    elif static_groups:
        W0 = W.detach().to(torch.float32).clone()
        W0[:, torch.diagonal(H).to(device) == 0] = 0  # dead inputs, as prepare_layer sets them
        out_grid = QuantGrid.fit(W0, grid.bits, grid.symmetric, "group", group_size, grid.mse)
        params, col_group = _grid_params(out_grid, rows, cols, dtype, device)
        if perm is not None:
            col_group = [col_group[c] for c in perm.tolist()]
    else:
        out_grid = None
        params, col_group = [], None
        scales, zeros = [], []

    QT = torch.empty_like(WT)
    RT = torch.empty_like(WT)
    w_cols, q_cols, r_cols = WT.unbind(0), QT.unbind(0), RT.unbind(0)
    maxq = grid.maxq
    bounds = _block_bounds(cols, block_size, group_size if dynamic else None)
    for i1, i2 in bounds:
        for j in range(i1, i2):
            if dynamic:
                if j % group_size == 0:
                    s, z = minmax_params(WT[j:j + group_size].t(), grid.bits, grid.symmetric, grid.mse)
                    scales.append(s)
                    zeros.append(z)
                    s_d, z_d = s.to(device=device, dtype=dtype), z.to(device=device, dtype=dtype)
                    cur = (s_d, -z_d, maxq - z_d)
            else:
                cur = params[col_group[j]]
            s, lo, hi = cur
            w, q, r = w_cols[j], q_cols[j], r_cols[j]
            torch.div(w, s, out=q)
            q.round_().clamp_(lo, hi).mul_(s)
            torch.sub(w, q, out=r)
            if j + 1 < i2:
                WT[j + 1:i2].addr_(V[j, j + 1:i2], r, alpha=-1)
        if i2 < cols:
            WT[i2:].addmm_(V[i1:i2, i2:].t(), RT[i1:i2], alpha=-1)

    if dynamic:
        g_idx = None
        if perm is not None:
            g_idx = torch.empty(cols, dtype=torch.long, device=device)
            g_idx[perm] = torch.arange(cols, device=device) // group_size
        out_grid = QuantGrid(grid.bits, torch.stack(scales, 1), torch.stack(zeros, 1), grid.symmetric,
                             "group", group_size, grid.mse, g_idx)

    Q = _finish_quantized(undo_column_perm(QT.t(), perm).contiguous(), out_grid, dtype)
    weight = Q.to(W.dtype)
    seconds = time.perf_counter() - t0
    return SolverResult(
        weight=weight,
        loss=layer_loss(W, weight, H),
        grid=out_grid,
        method="gptq",
        damp=prep.damp,
        seconds=seconds,
        info={"act_order": bool(act_order), "group_size": group_size, "static_groups": bool(static_groups),
              "block_size": block_size, "dtype": str(dtype).replace("torch.", "")},
    )


# ----------------------------------------------------------------------------------------------
# SparseGPT


@torch.no_grad()
def sparsegpt_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: Optional[float] = None,
    mask_structure: str = "unstructured",
    grid: Optional[QuantGrid] = None,
    block_size: int = 128,
    damp=0.01,
    columns_last: Optional[int] = None,
    dtype=torch.float32,
) -> SolverResult:
    """Prune W (and, with ``grid``, quantize the kept weights) in one SparseGPT pass.

    The mask is chosen per block of columns (unstructured: exactly ``num_pruned(sparsity, rows*cols)``
    weights over the whole layer, split over blocks by cumulative rounding) or per group of M columns
    ("N:M": N kept of every M in each row), by the score w^2 / U_jj^2 on the current weights.
    ``columns_last`` = K reorders conv columns (C, K) -> (K, C) so N:M groups run over channels.
    """
    t0 = time.perf_counter()
    check_int(block_size, "block_size")
    _check_dtype(dtype)
    _check_shapes(W, H)
    cols_in = W.shape[1]
    ms = parse_mask_structure(mask_structure, cols_in)
    if ms.kind == "block":
        raise ValueError(f"sparsegpt supports 'unstructured' and 'N:M' masks, not {ms}; "
                         "use the exact solver for block masks")
    sparsity = resolve_sparsity(sparsity, ms)
    if grid is not None:
        check_grid(grid, W)
    perm = columns_last_perm(cols_in, columns_last, device=W.device)
    prep, Wp, U = _prepare_in_order(W, H, perm, damp)
    rows, cols = W.shape
    device = W.device

    dU = torch.diagonal(U)
    d2 = dU.square().to(dtype)
    V = U.to(dtype)
    V.mul_((1.0 / dU).to(dtype)[:, None])
    del U, dU
    WT = torch.empty(cols, rows, dtype=dtype, device=device)
    WT.copy_(Wp.t())
    KT = torch.empty_like(WT)  # 1.0 where kept, in the loop dtype
    RT = torch.empty_like(WT)
    QT = torch.empty_like(WT) if grid is not None else None
    w_cols, k_cols, r_cols = WT.unbind(0), KT.unbind(0), RT.unbind(0)
    q_cols = QT.unbind(0) if grid is not None else None
    if grid is not None:
        params, col_group = _grid_params(grid, rows, cols, dtype, device)
        if perm is not None:
            col_group = [col_group[c] for c in perm.tolist()]

    total = rows * cols
    n_prune = num_pruned(sparsity, total) if ms.kind == "unstructured" else None
    unit = ms.m if ms.kind == "nm" else None
    n_drop = ms.pruned_per_group if ms.kind == "nm" else 0

    def cum_target(i):
        # pruned weights assigned to the first i columns: round-half-up of n_prune * i / cols
        return (2 * n_prune * i + cols) // (2 * cols)

    for i1, i2 in _block_bounds(cols, block_size, unit):
        if ms.kind == "unstructured":
            k = cum_target(i2) - cum_target(i1)
            blk = KT[i1:i2]
            blk.fill_(1)
            if k > 0:
                score = WT[i1:i2].square() / d2[i1:i2, None]
                idx = torch.topk(score.reshape(-1), k, largest=False, sorted=False).indices
                blk.view(-1)[idx] = 0
        for j in range(i1, i2):
            if unit is not None and j % unit == 0:
                score = WT[j:j + unit].square() / d2[j:j + unit, None]
                idx = torch.topk(score, n_drop, dim=0, largest=False, sorted=False).indices
                KT[j:j + unit].fill_(1).scatter_(0, idx, 0)
            w, keep, r = w_cols[j], k_cols[j], r_cols[j]
            if grid is not None:
                s, lo, hi = params[col_group[j]]
                q = q_cols[j]
                torch.div(w, s, out=q)
                q.round_().clamp_(lo, hi).mul_(s).mul_(keep)
                torch.sub(w, q, out=r)
            else:
                # w - w*keep, written so a pruned weight's residual is exactly w
                torch.mul(w, keep, out=r)
                torch.sub(w, r, out=r)
            if j + 1 < i2:
                WT[j + 1:i2].addr_(V[j, j + 1:i2], r, alpha=-1)
        if i2 < cols:
            WT[i2:].addmm_(V[i1:i2, i2:].t(), RT[i1:i2], alpha=-1)

    mask = (KT != 0).t()
    if grid is not None:
        # 0 is a grid point, so pruned weights stay on the grid; masked_fill also clears any -0.0
        Q = _finish_quantized(QT.t().contiguous(), grid, dtype).masked_fill_(~mask, 0)
    else:
        Q = WT.t().masked_fill(~mask, 0)
    Q, mask = undo_column_perm(Q, perm), undo_column_perm(mask, perm)
    weight = Q.to(W.dtype).contiguous()
    mask = mask.contiguous()
    seconds = time.perf_counter() - t0
    return SolverResult(
        weight=weight,
        loss=layer_loss(W, weight, H),
        mask=mask,
        grid=grid,
        method="sparsegpt",
        damp=prep.damp,
        seconds=seconds,
        info={"mask_structure": str(ms), "target_sparsity": sparsity, "block_size": block_size,
              "quantized": grid is not None, "columns_last": columns_last,
              "dtype": str(dtype).replace("torch.", "")},
    )
