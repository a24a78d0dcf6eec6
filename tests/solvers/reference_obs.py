"""Plain float64 right-looking OBS, one row at a time: the slow, obviously-correct reference.

Each step updates the full inverse Hessian of the row by Gaussian elimination, exactly as the
formulas read; no delayed updates, no compaction, no batching.
"""

import torch


def obs_row(w, Hinv, steps, *, choose, target):
    """Greedy elimination of one row; returns (order, losses, final w).

    ``choose(w, Hinv, alive, history) -> p`` and ``target(p, w) -> value w_p is fixed at``.
    """
    w = w.clone().double()
    Hinv = Hinv.clone().double()
    alive = torch.ones(w.numel(), dtype=torch.bool)
    order, losses = [], []
    for _ in range(steps):
        p = int(choose(w, Hinv, alive, order))
        t = float(target(p, w))
        d = Hinv[p, p]
        delta = w[p] - t
        losses.append(float(0.5 * delta**2 / d))
        w -= delta / d * Hinv[:, p]
        w[p] = t
        Hinv -= torch.outer(Hinv[:, p], Hinv[p, :]) / d
        alive[p] = False
        order.append(p)
    return order, losses, w


def prune_chooser(nm=None):
    """Cheapest w_p^2 / Hinv_pp; with nm=(keep, m), only in groups that may still lose a weight."""

    def choose(w, Hinv, alive, order):
        s = w**2 / torch.diagonal(Hinv)
        s[~alive] = float("inf")
        if nm is not None:
            keep, m = nm
            counts = torch.zeros(w.numel() // m, dtype=torch.long)
            for p in order:
                counts[p // m] += 1
            full = (counts >= m - keep).repeat_interleave(m)
            s[full] = float("inf")
        return torch.argmin(s)

    return choose


def quant_chooser(scale, zero, maxq):
    def q(x):
        return scale * (torch.clamp(torch.round(x / scale) + zero, 0, maxq) - zero)

    def choose(w, Hinv, alive, order):
        err = (w - q(w)) ** 2
        err[~alive] = 0
        if (err > 0.25 * scale**2).any():
            return torch.argmax(err)
        s = err / torch.diagonal(Hinv)
        s[~alive] = float("inf")
        return torch.argmin(s)

    def target(p, w):
        return q(w)[p]

    return choose, target, q


def block_row(w, Hinv, c):
    """Greedy elimination of blocks of c consecutive columns; returns (block order, losses)."""
    w = w.clone().double()
    Hinv = Hinv.clone().double()
    nb = w.numel() // c
    alive = torch.ones(nb, dtype=torch.bool)
    order, losses = [], []
    for _ in range(nb):
        best, bestb = float("inf"), -1
        for b in range(nb):
            if not alive[b]:
                continue
            sl = slice(b * c, (b + 1) * c)
            sc = float(w[sl] @ torch.linalg.solve(Hinv[sl, sl], w[sl]))
            if sc < best:
                best, bestb = sc, b
        sl = slice(bestb * c, (bestb + 1) * c)
        Dinv = torch.linalg.inv(Hinv[sl, sl])
        losses.append(0.5 * best)
        w -= Hinv[:, sl] @ (Dinv @ w[sl])
        w[sl] = 0
        Hinv -= Hinv[:, sl] @ Dinv @ Hinv[sl, :]
        alive[bestb] = False
        order.append(bestb)
    return order, losses


def correlated_problem(rows, cols, seed=0, n=None, dtype=torch.float64):
    """A layer with correlated inputs (X = Z A + noise), so that OBS re-fitting matters."""
    g = torch.Generator().manual_seed(seed)
    n = n or 4 * cols
    X = torch.randn(n, cols, generator=g, dtype=torch.float64) @ torch.randn(cols, cols, generator=g, dtype=torch.float64)
    X += 0.1 * torch.randn(n, cols, generator=g, dtype=torch.float64)
    H = 2 * X.T @ X / n
    W = torch.randn(rows, cols, generator=g, dtype=dtype)
    return W, H


def spectrum_problem(rows, cols, exponent, seed=0):
    """H = Q diag(logspace(0, -exponent, cols)) Q^T with Q a random orthogonal matrix: a Hessian of
    condition number 10^exponent (float64), and a standard normal W (float32)."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(cols, cols, generator=g, dtype=torch.float64))
    H = Q @ torch.diag(torch.logspace(0, -exponent, cols, dtype=torch.float64)) @ Q.T
    W = torch.randn(rows, cols, generator=g)
    return W, 0.5 * (H + H.T)
