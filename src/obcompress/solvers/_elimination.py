"""The exact greedy OBS elimination engine shared by ExactOBS pruning and OBQ quantization.

Every row r of W carries its own inverse Hessian over the coordinates it has not eliminated yet.
Eliminating coordinate p of a row moves the row to the least-squares optimum under the new
constraint (w_p fixed at a target t: 0 when pruning, q(w_p) when quantizing):

    loss += 1/2 (w_p - t)^2 / Hinv_pp,   w -= (w_p - t) / Hinv_pp * Hinv[:, p],
    Hinv -= u u^T with u = Hinv[:, p] / sqrt(Hinv_pp).

The reference implementation applies that rank-1 update to a (rows, cols, cols) stack at every
step, which is memory-bound. Here the updates are *delayed*: the stored matrix A lags behind by
at most ``B`` pending vectors U, so the current column p is A[:, p] - U U[p]^T (a small GEMV), the
diagonal and the weights are kept current in O(cols) per step, and every B steps A absorbs the
pending vectors in one rank-B GEMM (compute-bound). After each such flush the eliminated
coordinates are dropped (compaction), so the work per row is ~cols^3/3 multiply-adds instead of
cols^3. Rows are batched in chunks and every operation inside a step is vectorised over rows.
"""

from __future__ import annotations

import queue
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from . import _native
from . import progress as _progress
from ._common import MaskStructure, one_thread

# Pending vectors per flush: large enough for the rank-B update to run at GEMM speed, small
# enough that computing a column from the pending block stays cheap.
FLUSH_EVERY = 32
# Bytes of stored inverse Hessians per chunk of rows. With the fused kernel a step costs one call
# whatever the chunk, so chunks are small enough for the stored matrices to stay in the last-level
# cache between flushes; the pure-torch step costs ~40 operations, so it batches many more rows.
CHUNK_BYTES_NATIVE = 16 * 2**20
CHUNK_BYTES_TORCH = 256 * 2**20
CHUNK_ELEMS_TORCH = 128 * 1024  # weights (rows x cols) per torch chunk: its per-step vectors stay cached
# On a GPU a step costs ~40 kernel launches whatever the chunk: chunks as large as memory allows,
# up to this many bytes of stored inverse Hessians (the chunk holds two such buffers).
CHUNK_BYTES_CUDA_MAX = 16 * 2**30
# Compact (drop eliminated coordinates) once the live ones are at most this fraction: a compaction
# is one pass over the stored matrices, a flush over dead coordinates wastes GEMM work.
COMPACT_BELOW = 0.85


def _chunk_bytes_cuda(device: torch.device) -> int:
    free, _ = torch.cuda.mem_get_info(device)
    return int(min(CHUNK_BYTES_CUDA_MAX, free // 6))


def _rows_per_chunk(m: int, itemsize: int, rows: int, native: bool, device: Optional[torch.device] = None) -> int:
    if native:
        per = CHUNK_BYTES_NATIVE // max(1, m * m * itemsize)
    elif device is not None and device.type == "cuda":
        per = _chunk_bytes_cuda(device) // max(1, m * m * itemsize)
    else:
        per = min(CHUNK_ELEMS_TORCH // max(1, m), CHUNK_BYTES_TORCH // max(1, m * m * itemsize))
    per = max(1, min(rows, per))
    # Equal chunks: the last one is not left with a few rows that cost a full pass of steps.
    n_chunks = -(-rows // per)
    return -(-rows // n_chunks)


@dataclass
class Trajectory:
    """Per-row greedy elimination record.

    ``order[r, s]`` is the original column (or block index, for blocks) eliminated at step s of
    row r, -1 after the row ran out of coordinates; ``losses[r, s]`` the loss that step added;
    ``values`` (quantization only) the frozen value of every coordinate.
    """

    order: torch.Tensor  # (rows, steps) int64
    losses: torch.Tensor  # (rows, steps) float64
    values: Optional[torch.Tensor] = None  # (rows, cols)
    # Weights of the coordinates still alive when the run stopped (zero elsewhere): the re-fitted
    # row for a run that stops early (N:M), in the loop's precision.
    final: Optional[torch.Tensor] = None  # (rows, cols)
    # The step engine the loop ran on: "native" (the fused C kernel) or "torch".
    engine: str = "torch"


def _with_identity_slots(M: torch.Tensor, extra: int) -> torch.Tensor:
    """M (d x d) bordered by ``extra`` uncoupled coordinates d, d+1, ... with unit diagonal.

    Padding position j of a row points at slot d + j, so a padded sub-matrix comes out with
    identity padding and a padded right-hand side with zeros, without any masking pass.
    """
    d = M.shape[0]
    out = M.new_zeros(d + extra, d + extra)
    out[:d, :d] = M
    out.diagonal()[d:] = 1
    return out


def _support_index(sel: torch.Tensor):
    """Per-row indices of the True entries of ``sel`` (R, d), position j padded with d + j."""
    R, d = sel.shape
    counts = sel.sum(1)
    s = int(counts.max()) if R else 0
    # Stable sort puts each row's selected columns first, in column order.
    idx = torch.sort((~sel).to(torch.int8), dim=1, stable=True).indices[:, :s]
    pos = torch.arange(s, device=sel.device)
    valid = pos[None, :] < counts[:, None]
    return torch.where(valid, idx, (d + pos).expand_as(idx)), valid


def _sub_matrices(M: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """M[idx_r][:, idx_r] for every row r of ``idx``, identity where idx >= len(M) (padding)."""
    n = M.shape[0]
    R, s = idx.shape
    lib = _native.kernel() if M.device.type == "cpu" and M.dtype in (torch.float32, torch.float64) else None
    if lib is not None:
        M, idx = M.contiguous(), idx.contiguous()
        out = torch.empty(R, s, s, dtype=M.dtype)
        gather = lib.gather_sub_f32 if M.dtype == torch.float32 else lib.gather_sub_f64
        gather(R, n, s, M.data_ptr(), idx.data_ptr(), out.data_ptr())
        return out
    Ma = _with_identity_slots(M, s)
    flat = idx.unsqueeze(2) * (n + s) + idx.unsqueeze(1)
    return Ma.reshape(-1)[flat]


def _factor(M: torch.Tensor, what: str) -> torch.Tensor:
    L, info = torch.linalg.cholesky_ex(M)
    if bool((info != 0).any()):
        raise ValueError(f"{what} is not positive definite; use a larger damp")
    return L


def support_inverses(H: torch.Tensor, keep: torch.Tensor, dtype: torch.dtype = torch.float64):
    """Per-row inverse of H restricted to each row's support, padded to the largest support.

    Returns (Ainv (R, s, s) in ``dtype``, idx (R, s), valid (R, s)); padding entries are identity
    rows/cols with index 0 and valid False. The factor is always float64; for a float32 loop the
    inverse is formed from it in float32 (the loop's precision, at half the cost).
    Raises ValueError if some H_SS is not positive definite.
    """
    idx, valid = _support_index(keep)
    # One thread: the batched factorizations round differently with MKL's thread count (see one_thread).
    with one_thread(H.device):
        L = _factor(_sub_matrices(H, idx), "H restricted to a row's kept weights")
        inv = torch.cholesky_inverse(L.to(dtype))
    return inv, torch.where(valid, idx, torch.zeros_like(idx)), valid


def _apply_sub(X: torch.Tensor, idx: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """X[idx_r][:, idx_r] z_r for every row (identity on padding), by one dense GEMM."""
    n, e = idx.shape
    d = X.shape[0]
    full = z.new_zeros(n, d + e).scatter_(1, idx, z)
    prod = F.pad(full[:, :d] @ X, (0, e))
    return torch.gather(prod, 1, idx) + torch.where(idx >= d, z, torch.zeros((), dtype=z.dtype))


# Relative residual a mixed-precision solve must reach, else the float64 factorization is used.
REFINE_TOLERANCE = 1e-11


def _solve_sub(X: torch.Tensor, idx: torch.Tensor, rhs: torch.Tensor, fast: bool, what: str) -> torch.Tensor:
    """z with X[idx_r][:, idx_r] z_r = rhs_r for every row (X float64, shared by all rows).

    ``fast``: factor in float32 (half the time and traffic of the batched Cholesky) and recover
    float64 accuracy by iterative refinement, whose residuals are dense float64 GEMMs; when that
    does not converge (ill-conditioned X), fall back to the float64 factorization. On one thread
    on the CPU, so that the result is the same at any thread count (see ``one_thread``).
    """
    with one_thread(X.device):
        if fast:
            L32, info = torch.linalg.cholesky_ex(_sub_matrices(X.float(), idx))
            if bool((info == 0).all()):
                z = torch.cholesky_solve(rhs.float().unsqueeze(2), L32).squeeze(2).double()
                scale = rhs.norm(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
                for _ in range(4):
                    r = rhs - _apply_sub(X, idx, z)
                    if bool(((r.norm(dim=1) / scale) <= REFINE_TOLERANCE).all()):
                        return z
                    z = z + torch.cholesky_solve(r.float().unsqueeze(2), L32).squeeze(2).double()
        L = _factor(_sub_matrices(X, idx), what)
        return torch.cholesky_solve(rhs.unsqueeze(2), L).squeeze(2)


def refit_on_support(W: torch.Tensor, H: torch.Tensor, Hinv: torch.Tensor, keep: torch.Tensor,
                     chunk_rows: int = 256, fast: bool = False) -> torch.Tensor:
    """Least-squares optimum of every row with its pruned weights (keep False) fixed at zero.

    min_w (w - w0) H (w - w0)^T s.t. w_P = 0 has the two equivalent closed forms
        w = w0 - (Hinv_PP^-1 w0_P) Hinv[P, :]      and      w_S = w0_S + (H_SS)^-1 H_SP w0_P;
    each row uses the one with the smaller system. Rows are sorted by that size and solved in
    padded batches, in float64 (``fast``: float32 factors refined to float64 accuracy).
    """
    R, d = W.shape
    out = W.clone()
    pruned = ~keep
    npruned = pruned.sum(1)
    use_p = npruned <= (d - npruned)
    size = torch.where(use_p, npruned, d - npruned)
    rows_sorted = torch.argsort(size, stable=True)
    for start in range(0, R, chunk_rows):
        rows = rows_sorted[start:start + chunk_rows]
        for form in (True, False):
            sel = rows[use_p[rows] == form]
            if sel.numel() == 0:
                continue
            w0 = W[sel]
            if form:
                P = pruned[sel]
                if not bool(P.any()):
                    continue
                idx, _ = _support_index(P)
                e = idx.shape[1]
                rhs = torch.gather(F.pad(w0, (0, e)), 1, idx)
                z = _solve_sub(Hinv, idx, rhs, fast, "H^-1 restricted to the pruned weights")
                za = W.new_zeros(len(sel), d + e).scatter_(1, idx, z)
                w = w0 - za[:, :d] @ Hinv
            else:
                keep_s = keep[sel]
                idx, _ = _support_index(keep_s)
                e = idx.shape[1]
                g = F.pad((w0 * (~keep_s)) @ H, (0, e))
                z = _solve_sub(H, idx, torch.gather(g, 1, idx), fast, "H restricted to a row's kept weights")
                # Padding slots point past column d and are dropped.
                w = w0 + W.new_zeros(len(sel), d + e).scatter_(1, idx, z)[:, :d]
            w[~keep[sel]] = 0
            out[sel] = w
    return out


class _Chunk:
    """State of one batch of rows during elimination (all tensors compacted to m coordinates)."""

    def __init__(self, A, w, idx, alive, extras, slots=FLUSH_EVERY, buffers=None, lib=None):
        R, m, _ = A.shape
        self.lib = lib  # the fused kernels, when compiled (compaction in place)
        # A lives in the first of two flat buffers allocated once per solver call and reused by
        # every chunk: compaction copies between them, and fresh multi-MB tensors would have to
        # be page-faulted in again (as slow as the copy itself).
        if buffers is None or buffers[0].numel() < R * m * m:
            buffers = (A.new_empty(R * m * m), A.new_empty(R * m * m))
        self._buf, self._tmp = buffers
        # Rows that start from the same H^-1 share it (an expanded view) until the first flush,
        # which writes A - U^T U into the buffer: one pass instead of a copy and an update.
        self.shared = A.stride(0) == 0
        if not self.shared:
            self._buf[: R * m * m].view(R, m, m).copy_(A)
            A = self._buf[: R * m * m].view(R, m, m)
        self.A = A  # stored inverse Hessians, lagging by the pending vectors
        self.w = w  # (R, m) current weights
        self.idx = idx  # (R, m) original column of each compact coordinate
        self.alive = alive  # (R, m) not yet eliminated (and not padding)
        self.extras = extras  # name -> (R, m) per-coordinate data that follows compaction
        # +inf where a coordinate may not be chosen; adding it to the scores masks them in one pass.
        self.pen = torch.zeros_like(w).masked_fill_(~alive, float("inf"))
        self.slots = slots
        self.U = torch.zeros(R, slots, m, dtype=A.dtype, device=A.device)
        self.k = 0
        self.diag = torch.diagonal(A, dim1=1, dim2=2).clone()
        self.diag.masked_fill_(~alive, 1.0)
        self.ar = torch.arange(R, device=A.device)

    @property
    def m(self):
        return self.A.shape[1]

    def column(self, p):
        """Current H^-1 column p of every row: stored row p (symmetry) minus the pending part."""
        col = self.A[self.ar, p]
        if self.k:
            coef = self.U[self.ar, : self.k, p]  # (R, k)
            col = torch.baddbmm(col.unsqueeze(1), coef.unsqueeze(1), self.U[:, : self.k], alpha=-1.0).squeeze(1)
        return col

    def eliminate(self, p, col, step_coef, inv_sqrt_d, target):
        """The OBS step for coordinate p of every row: re-fit w, queue the rank-1 H^-1 update."""
        ar = self.ar
        self.w.addcmul_(col, step_coef.unsqueeze(1), value=-1.0)
        self.w[ar, p] = target
        u = self.U[:, self.k]
        torch.mul(col, inv_sqrt_d.unsqueeze(1), out=u)
        self.diag.addcmul_(u, u, value=-1.0)
        self.k += 1
        # An eliminated coordinate keeps diag 1 so that its score stays finite (then masked by pen).
        self.diag[ar, p] = 1.0
        self.alive[ar, p] = False
        self.pen[ar, p] = float("inf")

    def flush(self, compact: bool = True):
        if self.k:
            Uk = self.U[:, : self.k]
            if self.shared:
                R, m, _ = self.A.shape
                out = self._buf[: R * m * m].view(R, m, m)
                torch.baddbmm(self.A, Uk.transpose(1, 2), Uk, alpha=-1.0, out=out)
                self.A, self.shared = out, False
            else:
                self.A.baddbmm_(Uk.transpose(1, 2), Uk, alpha=-1.0)
            self.k = 0
        if not compact:
            return
        R, m = self.alive.shape
        m_new = int(self.alive.sum(1).max())
        if m_new == 0 or m_new > COMPACT_BELOW * m:
            return
        # Stable sort keeps alive coordinates in their column order (blocks stay contiguous).
        sel = torch.sort((~self.alive).to(torch.int8), dim=1, stable=True).indices[:, :m_new].contiguous()
        if self.lib is not None:
            compact = self.lib.compact_f32 if self.A.dtype == torch.float32 else self.lib.compact_f64
            compact(R, m, m_new, self.A.data_ptr(), sel.data_ptr())
            self.A = self._buf[: R * m_new * m_new].view(R, m_new, m_new)
        else:
            # Rows by index_select (row copies), then the same for columns through one transposed
            # copy: by symmetry the result is A[sel][:, sel]. Much faster than an element-wise gather.
            ridx = (self.ar * m).unsqueeze(1).add(sel).flatten()
            rows = self._tmp[: R * m_new * m].view(R * m_new, m)
            torch.index_select(self.A.view(R * m, m), 0, ridx, out=rows)
            cols = self._buf[: R * m * m_new].view(R, m, m_new)
            cols.copy_(rows.view(R, m_new, m).transpose(1, 2))
            out = self._tmp[: R * m_new * m_new].view(R * m_new, m_new)
            torch.index_select(cols.view(R * m, m_new), 0, ridx, out=out)
            self._buf, self._tmp = self._tmp, self._buf
            self.A = out.view(R, m_new, m_new)
        for name in ("w", "idx", "alive", "diag", "pen"):
            setattr(self, name, torch.gather(getattr(self, name), 1, sel))
        for name, t in self.extras.items():
            self.extras[name] = torch.gather(t, 1, sel)
        self.U = torch.zeros(R, self.slots, m_new, dtype=self.A.dtype, device=self.A.device)


def _start_chunk(W64, H64, Hinv64, rows, keep, dtype, extras, slots=FLUSH_EVERY, buffers=None, lib=None):
    """Initial state for ``rows``: the full H^-1, or per-row (H_SS)^-1 where a support is given."""
    w0 = W64[rows]
    R, d = w0.shape
    if keep is None or bool(keep[rows].all()):
        A = Hinv64.to(dtype).expand(R, d, d)
        idx = torch.arange(d, device=W64.device).expand(R, d).clone()
        alive = torch.ones(R, d, dtype=torch.bool, device=W64.device)
        w = w0.to(dtype)
    else:
        A, idx, alive = support_inverses(H64, keep[rows], dtype)
        w = torch.gather(w0, 1, idx).to(dtype)
        w = torch.where(alive, w, torch.zeros((), dtype=dtype))
    ex = {name: torch.gather(t[rows], 1, idx) for name, t in extras.items()}
    return _Chunk(A, w, idx, alive, ex, slots, buffers, lib)


def _for_chunks(chunks, run, buffer_elems, dtype, device, parallel):
    """Call ``run(rows, buffers)`` for every chunk of rows.

    With the fused kernel, chunks are independent and both the kernel calls and torch's GEMMs
    release the GIL: on a machine with several cores the chunks then run on as many Python threads
    as torch would use, each with its own buffers.
    """
    workers = min(torch.get_num_threads(), len(chunks)) if parallel else 1
    tick = _progress.rows_reporter(sum(len(rows) for rows in chunks))
    if tick is not None:
        inner = run

        def run(rows, buffers):
            inner(rows, buffers)
            tick(len(rows))

    def make_buffers():
        return (torch.empty(buffer_elems, dtype=dtype, device=device),
                torch.empty(buffer_elems, dtype=dtype, device=device))

    if workers <= 1:
        buffers = make_buffers()
        for rows in chunks:
            run(rows, buffers)
        return
    pool = queue.SimpleQueue()
    for _ in range(workers):
        pool.put(make_buffers())

    def task(rows):
        buffers = pool.get()
        try:
            run(rows, buffers)
        finally:
            pool.put(buffers)

    # torch's thread count is process-wide: setting it to 1 for the chunks' small GEMMs would also
    # slow down whatever else the process runs meanwhile (and concurrent solves would restore each
    # other's settings), so it is left as the caller set it.
    with ThreadPoolExecutor(workers) as ex:
        list(ex.map(task, chunks))


def greedy_single(W64, H64, Hinv64, policy, *, keep=None, dtype=torch.float32, extras=None,
                  max_steps=None, record_values=False, record_final=False):
    """Run the greedy one-coordinate-at-a-time elimination on every row.

    ``policy`` provides ``scores(chunk)`` (R, m) including ``chunk.pen``, ``choose(chunk, scores)``
    -> p (R,), ``target(chunk, p)`` -> the value w_p is frozen at, and ``eliminated(chunk, p)``
    for its own bookkeeping. ``keep`` (R, d) restricts each row to a support (the other weights
    are zero and stay zero). Returns a Trajectory.
    """
    R, d = W64.shape
    extras = extras or {}
    steps_total = d if max_steps is None else max_steps
    order = torch.full((R, steps_total), -1, dtype=torch.int64, device=W64.device)
    losses = torch.zeros(R, steps_total, dtype=torch.float64, device=W64.device)
    values = torch.zeros(R, d, dtype=torch.float64, device=W64.device) if record_values else None
    final = torch.zeros(R, d, dtype=torch.float64, device=W64.device) if record_final else None
    itemsize = torch.tensor([], dtype=dtype).element_size()
    if keep is not None:
        # Similar support sizes in one chunk keep the padding small.
        row_order = torch.argsort(keep.sum(1), stable=True)
    else:
        row_order = torch.arange(R, device=W64.device)
    lib = _native.kernel() if W64.device.type == "cpu" and dtype in (torch.float32, torch.float64) else None
    per = _rows_per_chunk(d, itemsize, R, native=lib is not None, device=W64.device)
    tiny = torch.finfo(dtype).tiny
    chunks = [row_order[start:start + per] for start in range(0, R, per)]
    if keep is not None:
        chunks = [rows for rows in chunks if bool(keep[rows].any())]

    def run(rows, buffers):
        ch = _start_chunk(W64, H64, Hinv64, rows, keep, dtype, extras, buffers=buffers, lib=lib)
        counts = ch.alive.sum(1)
        n_steps = min(int(counts.max()), steps_total)
        # Rows with fewer coordinates than steps idle once they run out (padded supports only).
        uneven = bool((counts < n_steps).any())
        n = rows.numel()
        order_c = torch.full((n, n_steps), -1, dtype=torch.int64, device=W64.device)
        loss_c = torch.zeros(n, n_steps, dtype=torch.float64, device=W64.device)
        vals_c = torch.zeros(n, n_steps, dtype=torch.float64, device=W64.device) if record_values else None
        ar = ch.ar
        policy.begin(ch)
        if lib is not None:
            _native_steps(lib, ch, policy, n_steps, order_c, loss_c, vals_c)
            n_steps = 0  # done
        for step in range(n_steps):
            scores = policy.scores(ch)
            p = policy.choose(ch, scores)
            t = policy.target(ch, p)
            col = ch.column(p)
            dp = col[ar, p].clamp_min(tiny)
            delta = ch.w[ar, p] - t
            if uneven:
                active = ch.alive[ar, p]
                delta = torch.where(active, delta, torch.zeros((), dtype=dtype))
                t = torch.where(active, t, ch.w[ar, p])
                rs = torch.where(active, dp.rsqrt(), torch.zeros((), dtype=dtype))
                order_c[:, step] = torch.where(active, ch.idx[ar, p], torch.full_like(p, -1))
                ch.eliminate(p, col, delta / dp, rs, t)
            else:
                order_c[:, step] = ch.idx[ar, p]
                ch.eliminate(p, col, delta / dp, dp.rsqrt(), t)
            policy.eliminated(ch, p)
            loss_c[:, step] = (0.5 * delta * delta / dp).double()
            if record_values:
                vals_c[:, step] = t.double()
            if ch.k == ch.slots and step + 1 < n_steps:
                ch.flush()
        taken = order_c.shape[1]
        order[rows, :taken] = order_c
        losses[rows, :taken] = loss_c
        if record_values:
            valid = order_c >= 0
            sub = torch.zeros(n, d, dtype=torch.float64, device=W64.device)
            sub.scatter_(1, torch.where(valid, order_c, 0), torch.where(valid, vals_c, 0))
            if not bool(valid.all()):
                # A padding step aliases column 0: put column 0's real value back.
                first = torch.where(order_c == 0, vals_c, 0).sum(1)
                sub[:, 0] = first
            values[rows] = sub
        if record_final:
            # Adding (not writing): padding coordinates alias column 0 and carry zeros.
            alive_w = torch.where(ch.alive, ch.w, torch.zeros((), dtype=ch.w.dtype)).double()
            final[rows] = torch.zeros(n, d, dtype=torch.float64, device=W64.device).scatter_add_(1, ch.idx, alive_w)

    _for_chunks(chunks, run, per * d * d, dtype, W64.device, parallel=lib is not None)
    return Trajectory(order=order, losses=losses, values=values, final=final,
                      engine="native" if lib is not None else "torch")


def _ptr(t: Optional[torch.Tensor]) -> int:
    if t is None:
        return 0
    assert t.is_contiguous() or t.stride(0) == 0, "native kernel needs contiguous buffers"
    return t.data_ptr()


def _native_steps(lib, ch, policy, n_steps, order_c, loss_c, vals_c):
    """The step loop with the fused C kernel: one call per step for all rows of the chunk."""
    fn = lib.obs_step_f32 if ch.w.dtype == torch.float32 else lib.obs_step_f64
    R = ch.w.shape[0]
    scratch = torch.empty(R * ch.m, dtype=ch.w.dtype)
    out_stride = order_c.shape[1]
    order_p, loss_p = order_c.data_ptr(), loss_c.data_ptr()
    val_p = vals_c.data_ptr() if vals_c is not None else 0

    def state():
        # Everything up to the pending count k, then everything after it up to the outputs.
        mode, scale, zero, maxq, gid, counts, G, ppg = policy.native(ch)
        head = (R, ch.m, ch.slots)
        tail = (_ptr(ch.A), ch.A.stride(0), _ptr(ch.U), _ptr(ch.w), _ptr(ch.diag), _ptr(ch.pen),
                _ptr(ch.alive), _ptr(ch.idx), mode, _ptr(scale), _ptr(zero), maxq, _ptr(gid), _ptr(counts), G, ppg)
        return head, tail

    head, tail = state()
    scratch_p = scratch.data_ptr()
    for step in range(n_steps):
        fn(*head, ch.k, *tail, order_p + 8 * step, loss_p + 8 * step, val_p + 8 * step if val_p else 0,
           out_stride, scratch_p)
        ch.k += 1
        if ch.k == ch.slots and step + 1 < n_steps:
            ch.flush()
            head, tail = state()  # flush and compaction replace the buffers


class PrunePolicy:
    """ExactOBS pruning: the cheapest weight w_p^2 / Hinv_pp, optionally within N:M groups.

    Per-chunk state lives on the chunk, so that chunks can run concurrently.
    """

    def __init__(self, structure: MaskStructure):
        self.structure = structure
        self.nm = structure.kind == "nm"

    def begin(self, ch):
        if self.nm:
            R = ch.w.shape[0]
            d = int(ch.idx.max()) + 1
            m = self.structure.m
            ch.group_counts = torch.zeros(R, (d + m - 1) // m, dtype=torch.int32, device=ch.w.device)
            ch.extras["gid"] = (ch.idx // m).to(torch.int32)
        ch.zero_targets = torch.zeros(ch.w.shape[0], dtype=ch.w.dtype, device=ch.w.device)

    def scores(self, ch):
        return torch.addcdiv(ch.pen, ch.w * ch.w, ch.diag)

    def choose(self, ch, scores):
        return torch.argmin(scores, dim=1)

    def target(self, ch, p):
        return ch.zero_targets

    def native(self, ch):
        if self.nm:
            counts = ch.group_counts
            return 0, None, None, 0.0, ch.extras["gid"], counts, counts.shape[1], self.structure.pruned_per_group
        return 0, None, None, 0.0, None, None, 0, 0

    def eliminated(self, ch, p):
        if self.nm:
            gid = ch.extras["gid"]
            g = gid[ch.ar, p].long()
            ch.group_counts[ch.ar, g] += 1
            full = ch.group_counts[ch.ar, g] >= self.structure.pruned_per_group
            if bool(full.any()):
                # The group is done: its remaining weights are kept, no longer candidates.
                ch.pen.masked_fill_((gid == g.unsqueeze(1)) & full.unsqueeze(1), float("inf"))


class QuantPolicy:
    """OBQ: the weight whose rounding costs least, (w_p - q(w_p))^2 / Hinv_pp.

    Outlier rule of the paper: a weight pushed outside the grid's range (so that rounding moves it
    by more than half a step) is quantized first, the worst one first, before updates push it
    further.
    """

    def __init__(self, maxq: int):
        self.maxq = maxq

    def begin(self, ch):
        pass

    def scores(self, ch):
        s, z = ch.extras["scale"], ch.extras["zero"]
        raw = torch.round(ch.w / s).add_(z)
        code = raw.clamp(0, self.maxq)
        ch.q = (code - z).mul_(s)
        ch.q_err = (ch.w - ch.q).square_()
        ch.q_clamped = torch.ne(raw, code).logical_and_(ch.alive)
        return torch.addcdiv(ch.pen, ch.q_err, ch.diag)

    def choose(self, ch, scores):
        p = torch.argmin(scores, dim=1)
        out = ch.q_clamped
        if bool(out.any()):
            has = out.any(1)
            worst = torch.argmax(torch.where(out, ch.q_err, torch.full_like(ch.q_err, -1.0)), dim=1)
            p = torch.where(has, worst, p)
        return p

    def target(self, ch, p):
        return ch.q[ch.ar, p]

    def native(self, ch):
        return 1, ch.extras["scale"], ch.extras["zero"], float(self.maxq), None, None, 0, 0

    def eliminated(self, ch, p):
        pass


def block_trajectory(W64, Hinv64, block: int, dtype=torch.float32) -> Trajectory:
    """Greedy elimination of whole blocks of ``block`` consecutive columns (ExactOBS block pruning).

    Block b costs 1/2 w_b (Hinv_bb)^-1 w_b^T; eliminating it is the block version of the OBS step,
    i.e. ``block`` pending vectors V = L^-1 Hinv[b, :] with L L^T = Hinv_bb.
    """
    R, d = W64.shape
    c = block
    nb = d // c
    order = torch.full((R, nb), -1, dtype=torch.int64, device=W64.device)
    losses = torch.zeros(R, nb, dtype=torch.float64, device=W64.device)
    itemsize = torch.tensor([], dtype=dtype).element_size()
    native_ok = W64.device.type == "cpu" and dtype in (torch.float32, torch.float64) and c <= 16
    lib = _native.kernel() if native_ok else None
    per = _rows_per_chunk(d, itemsize, R, native=lib is not None, device=W64.device)
    chunks = [torch.arange(start, min(R, start + per), device=W64.device) for start in range(0, R, per)]

    def run(rows, buffers):
        ch = _start_chunk(W64, None, Hinv64, rows, None, dtype, {}, slots=max(FLUSH_EVERY, c), buffers=buffers,
                          lib=lib)
        n = rows.numel()
        ar = ch.ar
        dblk = _diag_blocks(ch.A, c)
        within = torch.arange(c, device=W64.device)
        if lib is not None:
            order[rows], losses[rows] = _native_block_steps(lib, ch, c, nb, dblk)
            return
        for step in range(nb):
            m = ch.m
            nbc = m // c
            blk_alive = ch.alive.view(n, nbc, c)[:, :, 0]
            wb = ch.w.view(n, nbc, c)
            Lb, _ = torch.linalg.cholesky_ex(dblk)
            y = torch.linalg.solve_triangular(Lb, wb.unsqueeze(3), upper=False).squeeze(3)
            score = (y * y).sum(2)
            score = torch.where(blk_alive, score, torch.full_like(score, float("inf")))
            b = torch.argmin(score, dim=1)
            cols = b.unsqueeze(1) * c + within  # (n, c) compact columns
            colsH = ch.A[ar[:, None], cols]  # (n, c, m)
            if ch.k:
                coef = ch.U[ar[:, None], : ch.k, cols]  # (n, c, k)
                colsH = colsH - torch.bmm(coef, ch.U[:, : ch.k])
            D = colsH[ar[:, None, None], within[None, :, None], cols[:, None, :]]  # (n, c, c)
            L, _ = torch.linalg.cholesky_ex(D)
            V = torch.linalg.solve_triangular(L, colsH, upper=False)  # (n, c, m)
            yb = torch.linalg.solve_triangular(L, ch.w[ar[:, None], cols].unsqueeze(2), upper=False)
            ch.w -= torch.bmm(yb.transpose(1, 2), V).squeeze(1)
            ch.w[ar[:, None], cols] = 0
            losses[rows, step] = 0.5 * (yb.double() ** 2).sum((1, 2))
            order[rows, step] = ch.idx[ar, b * c] // c
            ch.alive[ar[:, None], cols] = False
            ch.U[:, ch.k:ch.k + c] = V
            ch.k += c
            Vb = V.view(n, c, nbc, c)
            dblk = dblk - torch.einsum("nvbi,nvbj->nbij", Vb, Vb)
            if ch.k + c > ch.slots:
                ch.flush()
                dblk = _diag_blocks(ch.A, c)

    _for_chunks(chunks, run, per * d * d, dtype, W64.device, parallel=lib is not None)
    return Trajectory(order=order, losses=losses, engine="native" if lib is not None else "torch")


def _native_block_steps(lib, ch, c, nb, dblk):
    """The block step loop with the fused C kernel; returns (order, losses) of the chunk."""
    fn = lib.block_step_f32 if ch.w.dtype == torch.float32 else lib.block_step_f64
    n = ch.w.shape[0]
    order_c = torch.full((n, nb), -1, dtype=torch.int64)
    loss_c = torch.zeros(n, nb, dtype=torch.float64)
    scratch = torch.empty(n * c * ch.m, dtype=ch.w.dtype)
    order_p, loss_p, scratch_p = order_c.data_ptr(), loss_c.data_ptr(), scratch.data_ptr()
    for step in range(nb):
        fn(n, ch.m, ch.slots, ch.k, c, ch.A.data_ptr(), ch.A.stride(0), ch.U.data_ptr(), ch.w.data_ptr(),
           dblk.data_ptr(), ch.alive.data_ptr(), ch.idx.data_ptr(), order_p + 8 * step, loss_p + 8 * step, nb,
           scratch_p)
        ch.k += c
        if ch.k + c > ch.slots and step + 1 < nb:
            ch.flush()
            dblk = _diag_blocks(ch.A, c)  # the kept blocks, exact again after the flush
    return order_c, loss_c


def _diag_blocks(A, c):
    n, m, _ = A.shape
    nb = m // c
    return torch.diagonal(A.view(n, nb, c, nb, c), dim1=1, dim2=3).permute(0, 3, 1, 2).contiguous()
