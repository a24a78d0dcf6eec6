"""How the exact solvers' time grows with a layer's width: seconds per row of OBQ 4-bit and
ExactOBS 50 % from 576 to 4,608 columns, beside GPTQ / SparseGPT, and the layer time they project.

The exact solvers pay ~cols^3/3 multiply-adds per row (each row eliminates its cols weights, each
step touching a compacted cols x cols inverse), so a layer costs ~rows * cols^3. Rows are
independent, so the figures here come from a few rows and scale linearly with the row count.
GPTQ and SparseGPT cost ~cols^3 once plus rows * cols^2, so they are timed on 256 real rows.
W is standard normal; H = 2 X^T X / n from correlated inputs (n = 2 * cols). A same-run torch.mm
rate is printed, because other jobs may load the machine.

Usage:
    python benchmarks/wide_layers.py [--cols 576,1152,2304,3200,4608] [--rows 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from obcompress.solvers import QuantGrid, exact_obs_prune, gptq_quantize, obq_quantize, sparsegpt_prune


def _problem(rows: int, cols: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = 2 * cols
    X = torch.randn(n, cols, generator=g) @ (torch.randn(cols, cols, generator=g) / cols ** 0.5)
    X += 0.1 * torch.randn(n, cols, generator=g)
    H = (2 * X.T.double() @ X.double()) / n
    return torch.randn(rows, cols, generator=g), H


def _mm_gflops(size: int = 1024, repeats: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * size ** 3 / best / 1e9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cols", default="576,1152,2304,3200,4608")
    ap.add_argument("--rows", type=int, default=8, help="rows solved per layer width (default 8)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2, help="best of this many runs")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    widths = [int(c) for c in args.cols.split(",")]
    print(f"threads {args.threads}, load {os.getloadavg()[0]:.1f}, torch.mm {_mm_gflops():.0f} GFLOP/s, "
          f"{args.rows} rows per width, best of {args.repeats}")
    print("| cols | OBQ 4-bit s/row | ExactOBS 50 % s/row | OBQ 256 rows (proj.) | ExactOBS 256 rows (proj.) | "
          "ExactOBS 512 rows (proj.) | GPTQ 4-bit, 256 rows | SparseGPT 50 %, 256 rows |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for cols in widths:
        W, H = _problem(256, cols)
        Wr = W[: args.rows]
        grid, grid_r = QuantGrid.fit(W, 4), QuantGrid.fit(Wr, 4)
        runs = {
            "obq": (lambda: obq_quantize(Wr, H, grid_r), args.rows),
            "obs": (lambda: exact_obs_prune(Wr, H, 0.5), args.rows),
            "gptq": (lambda: gptq_quantize(W, H, grid), 1),
            "sgpt": (lambda: sparsegpt_prune(W, H, 0.5), 1),
        }
        t_ = {}
        for key, (fn, per) in runs.items():
            best = float("inf")
            for _ in range(args.repeats):
                t = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t)
            t_[key] = best / per
        print(f"| {cols:,d} | {t_['obq']:.3f} | {t_['obs']:.3f} | {256 * t_['obq']:.0f} s | {256 * t_['obs']:.0f} s | "
              f"{512 * t_['obs']:.0f} s | {t_['gptq']:.2f} s | {t_['sgpt']:.2f} s |", flush=True)
    print(f"load at the end {os.getloadavg()[0]:.1f}, torch.mm {_mm_gflops():.0f} GFLOP/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
