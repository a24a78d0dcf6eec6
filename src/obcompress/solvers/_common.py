"""Shared pieces of the layer solvers: input checks, the layer loss, Hessian preparation, results.

Everything here works on plain tensors (W: rows x cols, H: cols x cols) and raises ``ValueError``
with a message that names the problem, so that callers higher up can prefix the layer name.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..checks import MaskStructure, check_bits, check_damp, check_sparsity, parse_mask_structure  # noqa: F401

# Relative dampening levels tried, in order, when a solver is called with damp="auto".
# Zero comes first because it is the OBC reference's setting; the rest rescue rank-deficient H.
AUTO_DAMP_LEVELS = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
# "auto" also rejects a factor whose squared pivot ratio exceeds this: beyond it even the float64
# loop (chosen by ``loop_dtype`` for such H) keeps too few digits of H^-1.
AUTO_MAX_PIVOT_RATIO2 = 1e10
# When H itself is singular (fewer independent calibration samples than inputs), "auto" starts
# here: the greedy solvers may move weights freely along the directions H does not see, and a
# tiny lambda lets them drift far (measured: efficientnet-lite0's 1000 x 1280 classifier from 256
# samples, OBQ 8-bit at lambda = 1e-6 has 0.74 normalised error, at 1e-4 or 1e-2 5.5e-6; RTN 5.5e-5).
# 1e-2 is GPTQ's and SparseGPT's default.
AUTO_SINGULAR_MIN_DAMP = 1e-2


@contextlib.contextmanager
def one_thread(device: Any = None):
    """Run the block on one torch (and MKL) thread, then restore the caller's thread count; for
    work on another device than the CPU (``device``) nothing changes.

    Why: MKL's threaded Cholesky and inverse round differently with the thread count, and the
    exact solvers' float32 loops carry that difference of an ill-conditioned H^-1 into their loss
    records (measured: digits-cnn's conv2 and fc1 records differ between 1 and 2 threads). The
    setting is the calling thread's (OpenMP's and MKL's counts are per thread): chunk workers and
    other threads of the process keep theirs.
    """
    if device is not None and torch.device(device).type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    if threads != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if threads != 1:
            torch.set_num_threads(threads)


@dataclass
class SolverResult:
    """Outcome of compressing one layer.

    ``weight`` has the shape and dtype of the input W; ``mask`` is True where a weight is kept
    (None when nothing was pruned); ``loss`` is ``layer_loss(W, weight, H)`` with the H given
    (undamped); ``grid`` is the quantization grid used (None for pure pruning). ``info`` holds
    what the solver reports of how it ran; ``info["engine"]`` is always there: "native" when the
    exact solvers' greedy loop ran on the fused C kernel, else "torch".
    """

    weight: torch.Tensor
    loss: float
    mask: Optional[torch.Tensor] = None
    grid: Any = None
    method: str = ""
    damp: float = 0.0
    seconds: float = 0.0
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        self.info.setdefault("engine", "torch")

    @property
    def sparsity(self) -> float:
        if self.mask is None:
            return 0.0
        return 1.0 - self.mask.float().mean().item()


def row_losses(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Each row's share 1/2 (w - w_hat) H (w - w_hat)^T of the layer objective, float64 (rows,)."""
    D = W.to(torch.float64) - W_hat.to(device=W.device, dtype=torch.float64)
    return 0.5 * ((D @ H.to(device=D.device, dtype=torch.float64)) * D).sum(1)


def layer_loss(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """The layer objective 1/2 tr((W - W_hat) H (W - W_hat)^T), accumulated in float64."""
    if W.shape != W_hat.shape:
        raise ValueError(f"layer_loss: W has shape {tuple(W.shape)} but W_hat has {tuple(W_hat.shape)}")
    if H.dim() != 2 or H.shape[0] != H.shape[1] or H.shape[0] != W.shape[1]:
        raise ValueError(f"layer_loss: H has shape {tuple(H.shape)}, W has {W.shape[1]} columns")
    D = (W.to(torch.float64) - W_hat.to(torch.float64))
    H = H.to(device=D.device, dtype=torch.float64)
    return 0.5 * serial_sum((D @ H) * D)


def serial_sum(t: torch.Tensor) -> float:
    """``float(t.sum())`` added up in one order whatever the thread count: torch splits a long sum
    across its threads and the partial sums round differently (measured: a database's recorded
    losses differed in their last digit between 1 and 2 threads)."""
    with one_thread(t.device):
        return float(t.sum())


# Precision of the greedy loop. Each step subtracts u_j^2 from the H^-1 diagonal, which falls from
# Hinv_pp (the start) towards 1/H_pp (p the last coordinate left): the loop loses about
# log10(Hinv_pp * H_pp) of its digits there ("diagonal growth", max over p; 1 for a diagonal H).
# float32 holds 7 digits. Measured on H = Q diag(logspace(0, -k, n)) Q^T, n = 64 and 256
# (benchmarks/RESULTS.md, "OBQ on ill-conditioned Hessians"): OBQ, whose frozen values come out
# of the loop, matched its float64 loop while growth <= 1e5 (minilm's FFN: 1.8e5, 3 % worse),
# mis-predicted its own loss by 1-15 % at 1e6 and fell apart (100-2000x RTN's loss) from 5e6.
# ExactOBS only ranks weights in the loop and re-fits them in float64, and stayed within 1 % up
# to growth 1e7.
FLOAT32_MAX_GROWTH_VALUES = 1e5
FLOAT32_MAX_GROWTH_ORDER = 1e7
# A row whose loss, measured in float64 against the H the loop used, differs from the sum of the
# loop's own step losses by more than this (relative) has drifted and is solved again in float64.
DRIFT_TOLERANCE = 1e-2


def diagonal_growth(H: torch.Tensor, Hinv: torch.Tensor) -> float:
    """max_p Hinv_pp * H_pp: how far the greedy loop cancels the H^-1 diagonal (see above)."""
    return float((torch.diagonal(Hinv) * torch.diagonal(H)).max())


def loop_dtype(dtype, prep: "PreparedLayer", max_growth: float) -> torch.dtype:
    """The greedy loop's precision: ``dtype`` as given, or for "auto" float32 unless the diagonal
    growth of the prepared H exceeds ``max_growth``, float64 then."""
    if isinstance(dtype, str) and dtype == "auto":
        if prep.Hinv is None or diagonal_growth(prep.H, prep.Hinv) <= max_growth:
            return torch.float32
        return torch.float64
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be 'auto', torch.float32 or torch.float64, got {dtype!r}")
    return dtype


def drifted_rows(W0: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """Rows whose measured loss (float64, w.r.t. the H the loop used) disagrees with the loop's
    own prediction by more than ``DRIFT_TOLERANCE``: exact arithmetic makes the two equal."""
    measured = row_losses(W0, W_hat, H)
    predicted = predicted.to(device=measured.device, dtype=torch.float64)
    # A row that starts (nearly) on target has loss ~0 either way: an absolute floor at the row's
    # energy times float64 precision keeps such rows from counting as drift.
    floor = 1e-12 * row_losses(W0, torch.zeros_like(W0), H)
    gap = (measured - predicted).abs()
    bad = gap > DRIFT_TOLERANCE * torch.maximum(measured, predicted) + floor
    return bad | ~torch.isfinite(predicted)


def check_weight(W: torch.Tensor) -> None:
    if not isinstance(W, torch.Tensor):
        raise ValueError(f"W must be a torch.Tensor, got {type(W).__name__}")
    if W.dim() != 2:
        raise ValueError(f"W must be 2-D (rows x cols), got shape {tuple(W.shape)}")
    if W.numel() == 0:
        raise ValueError(f"W is empty (shape {tuple(W.shape)})")
    if not W.is_floating_point():
        raise ValueError(f"W must be floating point, got {W.dtype}")
    if not torch.isfinite(W).all():
        bad = (~torch.isfinite(W)).sum().item()
        raise ValueError(f"W has {bad} non-finite entries (NaN or inf)")


def check_hessian(H: torch.Tensor, cols: int) -> None:
    if not isinstance(H, torch.Tensor):
        raise ValueError(f"H must be a torch.Tensor, got {type(H).__name__}")
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"H must be square (cols x cols), got shape {tuple(H.shape)}")
    if H.shape[0] != cols:
        raise ValueError(f"H is {H.shape[0]}x{H.shape[1]} but W has {cols} columns")
    if not torch.isfinite(H).all():
        raise ValueError("H has non-finite entries (NaN or inf): the calibration inputs overflowed or were invalid")
    if (torch.diagonal(H) < 0).any():
        raise ValueError("H has negative diagonal entries: it is not a Hessian of the form 2XX^T/n")


def num_pruned(sparsity: float, total: int) -> int:
    """How many weights a sparsity level removes out of ``total`` (round half up, as one count rule for all)."""
    return int(math.floor(sparsity * total + 0.5))


def columns_last_perm(cols: int, columns_last: Optional[int], device=None) -> Optional[torch.Tensor]:
    """Permutation that reorders PyTorch's conv flattening (C, K) into (K, C).

    ``columns_last`` is the number K of kernel taps (kh*kw) when the columns are a conv weight's
    ``flatten(1)``; after the permutation, consecutive columns are input channels at one tap, so N:M
    groups and blocks run across channels (the OBC reference's ``columnslast``). None: no reordering.
    """
    if columns_last is None or columns_last == 1:
        return None
    if not isinstance(columns_last, int) or columns_last < 1 or cols % columns_last:
        raise ValueError(f"columns_last={columns_last!r} must be a positive integer dividing cols={cols}")
    C = cols // columns_last
    return torch.arange(cols, device=device).reshape(C, columns_last).t().reshape(-1)


def resolve_sparsity(sparsity: Optional[float], ms: MaskStructure) -> float:
    """The sparsity a pruning call means: N:M fixes its own, anything else needs it given."""
    fixed = ms.fixed_sparsity
    if sparsity is None:
        if fixed is None:
            raise ValueError(f"sparsity is required for mask_structure {ms} (only N:M fixes its own sparsity)")
        return fixed
    check_sparsity(sparsity)
    if fixed is not None and abs(sparsity - fixed) > 1e-9:
        raise ValueError(f"sparsity={sparsity} contradicts mask_structure {ms}, which is {fixed:g} sparse; "
                         "pass sparsity=None")
    return float(sparsity)


def undo_column_perm(X: torch.Tensor, perm: Optional[torch.Tensor]) -> torch.Tensor:
    """X computed on columns ``X_orig[:, perm]``, put back in the original column order."""
    if perm is None:
        return X
    out = torch.empty_like(X)
    out[:, perm] = X
    return out


@dataclass
class PreparedLayer:
    W: torch.Tensor  # float64 copy of W with dead columns zeroed
    H: torch.Tensor  # float64, dead diagonal set to 1, dampened
    Hinv: Optional[torch.Tensor]  # float64 inverse of H (None when not asked for)
    L: torch.Tensor  # lower Cholesky factor of H
    damp: float  # relative dampening actually applied
    dead: torch.Tensor  # bool (cols,)


def _resolve_levels(damp) -> tuple:
    damp = "auto" if damp is None else check_damp(damp)
    if damp == "auto":
        return AUTO_DAMP_LEVELS, True
    return (damp,), False


def prepare_layer(W: torch.Tensor, H: torch.Tensor, damp="auto", inverse: bool = True,
                  serial: bool = True) -> PreparedLayer:
    """Check W and H, handle dead inputs, dampen relative to mean(diag H), factor (and invert) in float64.

    Dead inputs (zero diagonal: the input is always zero) are decoupled in H and their weights set
    to 0, which changes nothing in the layer's output. With ``damp="auto"`` the smallest level of
    ``AUTO_DAMP_LEVELS`` whose Cholesky factor exists and is not too ill-conditioned is used, and
    no level below ``AUTO_SINGULAR_MIN_DAMP`` when H itself is singular.
    ``inverse=False`` skips forming H^-1 (``Hinv`` is None) for solvers that only need the factor.
    ``serial``: factor on one thread (``one_thread``), so that the exact solvers give the same bits
    at any thread count; on CPU the factorization is O(cols^3 / 3) against the exact solvers'
    O(rows cols^3). GPTQ and SparseGPT pass False: their wide layers would pay for it (4608
    columns: 4.4 s on one thread, 3.3 s on two here) and their results hold per thread count.
    """
    check_weight(W)
    check_hessian(H, W.shape[1])
    W64 = W.detach().to(torch.float64).clone()
    H64 = H.detach().to(device=W.device, dtype=torch.float64).clone()
    H64 = 0.5 * (H64 + H64.t())
    dead = torch.diagonal(H64) == 0
    idx = torch.nonzero(dead).flatten()
    # All inputs dead (e.g. a depthwise channel after a ReLU that never fires): the weights do not
    # affect the output on this data, every solver then returns zeros at zero loss.
    mean_diag = float(torch.diagonal(H64)[~dead].mean()) if not dead.all() else 1.0
    H64[idx, :] = 0
    H64[:, idx] = 0
    # Any positive value decouples a dead input; the live mean keeps the pivot spread unchanged
    # (a fixed 1 would make the auto-dampening check depend on the scale of the activations).
    H64[idx, idx] = mean_diag
    W64[:, dead] = 0
    levels, auto = _resolve_levels(damp)
    singular = False
    for lam in levels:
        if singular and lam < AUTO_SINGULAR_MIN_DAMP:
            continue
        Hd = H64
        if lam > 0:
            Hd = H64.clone()
            Hd.diagonal().add_(lam * mean_diag)
        with one_thread(Hd.device) if serial else contextlib.nullcontext():
            L, info = torch.linalg.cholesky_ex(Hd)
            if int(info) != 0:
                singular = auto and lam == 0
                continue
            piv = torch.diagonal(L)
            if auto and float((piv.max() / piv.min()) ** 2) > AUTO_MAX_PIVOT_RATIO2:
                continue
            Hinv = torch.cholesky_inverse(L) if inverse else None
        return PreparedLayer(W=W64, H=Hd, Hinv=Hinv, L=L, damp=lam, dead=dead)
    tried = ", ".join(f"{x:g}" for x in levels)
    raise ValueError(
        f"H is not positive definite even after relative dampening (tried {tried} x mean diag H); "
        "use more calibration samples or a larger damp"
    )
