"""Layer Hessians H = 2/N * sum_n x_n x_n^T from calibration inputs, accumulated in float64.

A linear layer sees one sample per token (the rows of an (N, cols) or (B, T, cols) input). A conv
layer sees one sample per output position: its input is unfolded (kernel, stride, padding, dilation)
into columns in the order of ``weight.flatten(1)``, one Hessian per group, so that
``W_g.flatten(1) @ column`` is exactly the conv output at that position.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ..checks import check_damp, check_int

IntOrTuple = Union[int, Sequence[int]]



def all_finite(X: torch.Tensor) -> bool:
    """Whether every value of X is finite. A NaN or inf makes the sum non-finite, so the sum (one
    cheap reduction, no boolean copy of X) decides; only a non-finite sum, which finite values can
    also give by overflowing, is checked element by element."""
    if X.numel() == 0 or bool(torch.isfinite(X.sum())):
        return True
    return bool(torch.isfinite(X).all())


def _check_finite(X: torch.Tensor, what: str) -> None:
    if not all_finite(X):
        bad = int((~torch.isfinite(X)).sum())
        raise ValueError(f"{what} has {bad} non-finite values (NaN or inf): the calibration inputs overflowed or were invalid")


def _check_input_tensor(X, what: str) -> None:
    if not isinstance(X, torch.Tensor):
        raise ValueError(f"{what} must be a torch.Tensor, got {type(X).__name__}")
    if not X.is_floating_point():
        raise ValueError(f"{what} must be floating point, got {X.dtype}")


def hessian(X: torch.Tensor) -> torch.Tensor:
    """One-shot H = 2/N * X^T X in float64 for X of shape (N, cols) or (B, T, cols).

    All leading dimensions are samples; N is their product.
    """
    _check_input_tensor(X, "X")
    if X.dim() not in (2, 3):
        raise ValueError(f"X must be 2-D (N, cols) or 3-D (B, T, cols), got shape {tuple(X.shape)}")
    cols = X.shape[-1]
    if cols == 0 or X.numel() == 0:
        raise ValueError(f"empty calibration data: X has shape {tuple(X.shape)}")
    X64 = X.detach().reshape(-1, cols).to(torch.float64)
    _check_finite(X64, "X")
    return (2.0 / X64.shape[0]) * (X64.t() @ X64)


def dampen(H: torch.Tensor, rel: float) -> torch.Tensor:
    """H + rel * mean(diag H) * I as a new tensor (batched over leading dimensions)."""
    if not isinstance(H, torch.Tensor):
        raise ValueError(f"H must be a torch.Tensor, got {type(H).__name__}")
    if H.dim() < 2 or H.shape[-1] != H.shape[-2]:
        raise ValueError(f"H must be square (cols x cols, optionally batched), got shape {tuple(H.shape)}")
    rel = check_damp(rel, "relative dampening", auto=False)
    out = H.clone()
    diag = torch.diagonal(out, dim1=-2, dim2=-1)
    diag += rel * diag.mean(dim=-1, keepdim=True)
    return out


def _as_tuple(value, n: int, name: str, minimum: int) -> tuple:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int or a tuple of {n} ints, got {value!r}")
    if isinstance(value, int):
        value = (value,) * n
    try:
        value = tuple(value)
    except TypeError:
        raise ValueError(f"{name} must be an int or a tuple of {n} ints, got {value!r}") from None
    if len(value) != n or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError(f"{name} must be an int or a tuple of {n} ints, got {value!r}")
    if any(v < minimum for v in value):
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return value


def _conv_geometry(x, kernel_size, stride, padding, dilation, groups, padding_mode):
    """Validate a conv input and return it as 4-D plus the 2-D geometry and the (left, right) pads."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"conv input must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 3:
        nd = 1
    elif x.dim() == 4:
        nd = 2
    else:
        raise ValueError(
            f"conv input must be (B, C, L) for conv1d or (B, C, H, W) for conv2d, got shape {tuple(x.shape)}"
        )
    if x.numel() == 0:
        raise ValueError(f"empty calibration data: conv input has shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"conv input must be floating point, got {x.dtype}")
    if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
        raise ValueError(f"unknown padding_mode {padding_mode!r}: use 'zeros', 'reflect', 'replicate' or 'circular'")
    k = _as_tuple(kernel_size, nd, "kernel_size", 1)
    s = _as_tuple(stride, nd, "stride", 1)
    d = _as_tuple(dilation, nd, "dilation", 1)
    check_int(groups, "groups")
    C = x.shape[1]
    if C % groups:
        raise ValueError(f"{C} input channels are not divisible by groups={groups}")
    if isinstance(padding, str):
        if padding == "valid":
            pads = [(0, 0)] * nd
        elif padding == "same":
            if any(v != 1 for v in s):
                raise ValueError("padding='same' needs stride 1 (as in PyTorch)")
            # PyTorch puts the odd extra pad on the right/bottom.
            pads = []
            for ki, di in zip(k, d):
                total = di * (ki - 1)
                pads.append((total // 2, total - total // 2))
        else:
            raise ValueError(f"padding must be an int, a tuple, 'same' or 'valid', got {padding!r}")
    else:
        pads = [(p, p) for p in _as_tuple(padding, nd, "padding", 0)]
    spatial = x.shape[2:]
    for size, ki, si, di, (pl, pr) in zip(spatial, k, s, d, pads):
        if size + pl + pr - di * (ki - 1) < 1:
            raise ValueError(
                f"conv input of spatial size {tuple(spatial)} is smaller than the dilated kernel "
                f"{k} (dilation {d}, padding {padding!r})"
            )
    if nd == 1:
        x = x.unsqueeze(2)
        k, s, d, pads = (1,) + k, (1,) + s, (1,) + d, [(0, 0)] + pads
    return x, k, s, d, pads, nd


def _unfold_cols(x, k, s, d, pads, padding_mode):
    """(B, C, H, W) -> (B, C*kh*kw, positions), rows channel-major as weight.flatten(1)."""
    (ph0, ph1), (pw0, pw1) = pads
    if padding_mode != "zeros" or ph0 != ph1 or pw0 != pw1:
        if ph0 or ph1 or pw0 or pw1:
            mode = "constant" if padding_mode == "zeros" else padding_mode
            x = F.pad(x, (pw0, pw1, ph0, ph1), mode=mode)
        padding = (0, 0)
    else:
        padding = (ph0, pw0)
    return F.unfold(x, kernel_size=k, dilation=d, padding=padding, stride=s)


def _unfold4d(x, k, s, d, pads, groups, padding_mode):
    cols = _unfold_cols(x, k, s, d, pads, padding_mode)
    B, L = cols.shape[0], cols.shape[-1]
    # Group g owns a contiguous block of C/groups channels of the channel-major rows.
    cols = cols.reshape(B, groups, -1, L).permute(1, 0, 3, 2)
    return cols.reshape(groups, B * L, -1)


def unfold_conv_input(
    x: torch.Tensor,
    kernel_size: IntOrTuple,
    stride: IntOrTuple = 1,
    padding: Union[IntOrTuple, str] = 0,
    dilation: IntOrTuple = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """Conv input -> samples: (groups, B * positions, C/groups * prod(kernel)).

    ``x`` is (B, C, L) for conv1d or (B, C, H, W) for conv2d. Row n of group g, multiplied by
    ``weight[g*O/groups:(g+1)*O/groups].flatten(1)^T``, gives that group's conv outputs at one
    position. ``padding_mode`` follows ``nn.Conv*d`` (non-zero modes pad explicitly first).
    """
    x4, k, s, d, pads, _ = _conv_geometry(x, kernel_size, stride, padding, dilation, groups, padding_mode)
    return _unfold4d(x4.detach(), k, s, d, pads, groups, padding_mode)


class HessianAccumulator:
    """Streaming H = mean over samples of 2 x x^T, in float64.

    ``groups > 1`` keeps one Hessian per conv group (depthwise: groups == C, cols = kh*kw). The
    running mean is rescaled by n_old/n_new at each batch instead of summing and dividing at the
    end, so H stays O(1) in magnitude however many samples arrive.
    """

    def __init__(self, cols: int, groups: int = 1, device=None):
        check_int(cols, "cols")
        check_int(groups, "groups")
        self.cols = cols
        self.groups = groups
        self.device = None if device is None else torch.device(device)
        self._H: Optional[torch.Tensor] = None
        self._n = 0

    @property
    def nsamples(self) -> int:
        return self._n

    def _accumulate(self, Xg: torch.Tensor, checked: bool = False, samples_last: bool = False) -> None:
        """Xg: (groups, n, cols), or (groups, cols, n) with ``samples_last``; any float dtype/device.
        ``checked``: its values are known finite."""
        n = Xg.shape[2 if samples_last else 1]
        if n == 0:
            return
        if self._H is None:
            if self.device is None:
                self.device = Xg.device
            self._H = torch.zeros(self.groups, self.cols, self.cols, dtype=torch.float64, device=self.device)
        if not checked:
            _check_finite(Xg, "calibration input")
        X64 = Xg.detach().to(device=self.device, dtype=torch.float64)
        n_new = self._n + n
        self._H.mul_(self._n / n_new)
        if samples_last:
            self._H.baddbmm_(X64, X64.transpose(1, 2), alpha=2.0 / n_new)
        else:
            self._H.baddbmm_(X64.transpose(1, 2), X64, alpha=2.0 / n_new)
        self._n = n_new

    def add(self, X: torch.Tensor) -> None:
        """Add samples: (N, cols) or (B, T, cols) when groups == 1; (groups, N, cols) otherwise."""
        _check_input_tensor(X, "X")
        if self.groups == 1:
            if X.dim() not in (2, 3):
                raise ValueError(f"X must be 2-D (N, cols) or 3-D (B, T, cols), got shape {tuple(X.shape)}")
            if X.shape[-1] != self.cols:
                raise ValueError(f"X has {X.shape[-1]} columns but the accumulator expects {self.cols}")
            self._accumulate(X.reshape(1, -1, self.cols))
        else:
            if X.dim() != 3 or X.shape[0] != self.groups:
                raise ValueError(
                    f"with groups={self.groups}, X must be (groups, N, cols) = ({self.groups}, N, {self.cols}), "
                    f"got shape {tuple(X.shape)}"
                )
            if X.shape[-1] != self.cols:
                raise ValueError(f"X has {X.shape[-1]} columns but the accumulator expects {self.cols}")
            self._accumulate(X)

    def add_conv_input(
        self,
        x: torch.Tensor,
        kernel_size: IntOrTuple,
        stride: IntOrTuple = 1,
        padding: Union[IntOrTuple, str] = 0,
        dilation: IntOrTuple = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
    ) -> None:
        """Add a conv1d (B, C, L) or conv2d (B, C, H, W) input: every output position is one sample."""
        if groups != self.groups:
            raise ValueError(f"conv groups={groups!r} but the accumulator was made for groups={self.groups}")
        x4, k, s, d, pads, _ = _conv_geometry(x, kernel_size, stride, padding, dilation, groups, padding_mode)
        cols = (x4.shape[1] // groups) * k[0] * k[1]
        if cols != self.cols:
            raise ValueError(
                f"conv input gives {cols} columns per group ({x4.shape[1]} channels / {groups} groups x kernel {k}) "
                f"but the accumulator expects {self.cols}"
            )
        B = x4.shape[0]
        _check_finite(x4, "calibration input")
        if k == (1, 1) and s == (1, 1) and groups == 1 and not any(p for pad in pads for p in pad):
            # A pointwise conv: every pixel is a sample of its channels, no unfolding needed; a
            # channels-last float64 copy is the (pixels, channels) matrix itself, made in one pass.
            x64 = x4.detach().to(dtype=torch.float64, memory_format=torch.channels_last)
            self._accumulate(x64.permute(0, 2, 3, 1).reshape(1, -1, x4.shape[1]), checked=True)
            return
        # Converting before unfolding converts k times fewer values. One image at a time: its
        # unfolded (C*kh*kw, positions) block is, as a view, (groups, cols, positions), so no
        # transposed copy is made, and the unfolded copy stays one image's.
        x4 = x4.detach().to(torch.float64)
        for b in range(B):
            U = _unfold_cols(x4[b : b + 1], k, s, d, pads, padding_mode)[0]
            self._accumulate(U.reshape(groups, self.cols, U.shape[-1]), checked=True, samples_last=True)

    def hessian(self) -> torch.Tensor:
        """(cols, cols) for groups == 1, (groups, cols, cols) otherwise; a float64 copy."""
        if self._n == 0:
            raise ValueError("no calibration samples have been added to this Hessian accumulator yet")
        H = self._H.clone()
        return H[0] if self.groups == 1 else H
