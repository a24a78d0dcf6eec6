"""OBQ and ExactOBS on ill-conditioned Hessians: the default (``dtype="auto"``: loop precision from
H's diagonal growth, drifted rows redone in float64, no OBQ row worse than RTN) against a forced
float32 loop as it ran before, the float64 loop, round-to-nearest and GPTQ on the same grid.

H = Q diag(logspace(0, -k, cols)) Q^T with Q a random orthogonal matrix (cond 10^k); W standard
normal; per-channel symmetric 4-bit grid; ExactOBS 2:4 beside it. Prints a markdown table.

Usage:
    python benchmarks/ill_conditioned.py [--cols 64,256] [--exponents 4,6,8,9,10,12,14] [--seeds 2]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from obcompress.solvers import QuantGrid, exact_obs_prune, gptq_quantize, layer_loss, obq_quantize
from obcompress.solvers._common import diagonal_growth, prepare_layer


def problem(rows: int, cols: int, exponent: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(cols, cols, generator=g, dtype=torch.float64))
    H = Q @ torch.diag(torch.logspace(0, -exponent, cols, dtype=torch.float64)) @ Q.T
    return torch.randn(rows, cols, generator=g), 0.5 * (H + H.T)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cols", default="64,256")
    ap.add_argument("--exponents", default="4,6,8,9,10,12,14")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--rows", type=int, default=32)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print("| cols | cond | seed | growth | OBQ default | loop | f64 rows | RTN rows | OBQ float32 loop (before) "
          "| OBQ float64 loop | RTN | GPTQ | default / float64 | ExactOBS 2:4 default / float64 | s default | s float64 |")
    print("|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for cols in (int(c) for c in args.cols.split(",")):
        for k in (float(e) for e in args.exponents.split(",")):
            for seed in range(args.seeds):
                W, H = problem(args.rows, cols, k, seed)
                grid = QuantGrid.fit(W, 4)
                t = time.perf_counter()
                auto = obq_quantize(W, H, grid)
                s_auto = time.perf_counter() - t
                prep = prepare_layer(W, H, auto.damp)
                growth = diagonal_growth(prep.H, prep.Hinv)
                t = time.perf_counter()
                f64 = obq_quantize(W, H, grid, damp=auto.damp, dtype=torch.float64)
                s_f64 = time.perf_counter() - t
                rtn = layer_loss(W, grid.quantize(W), H)
                gptq = gptq_quantize(W, H, grid).loss
                nm = exact_obs_prune(W, H, mask_structure="2:4").loss
                nm64 = exact_obs_prune(W, H, mask_structure="2:4", dtype=torch.float64).loss
                print(f"| {cols} | 1e{k:g} | {seed} | {growth:.2g} | {auto.loss:.4g} | {auto.info['loop_dtype']} | "
                      f"{auto.info['float64_rows']} | {auto.info['rtn_rows']} | {_unchecked(W, H, grid, auto.damp):.4g} | "
                      f"{f64.loss:.4g} | {rtn:.4g} | {gptq:.4g} | {auto.loss / f64.loss:.3f} | {nm / nm64:.3f} | "
                      f"{s_auto:.2f} | {s_f64:.2f} |", flush=True)
    return 0


def _unchecked(W, H, grid, damp) -> float:
    """The loss of the plain float32 loop's values, as obq_quantize returned them before the
    drift check: straight from the greedy trajectory."""
    from obcompress.solvers._elimination import QuantPolicy, greedy_single

    prep = prepare_layer(W, H, damp)
    scale, zero = grid.expand(*W.shape)
    traj = greedy_single(prep.W, prep.H, prep.Hinv, QuantPolicy(grid.maxq), dtype=torch.float32,
                         extras={"scale": scale.float(), "zero": zero.float()}, record_values=True)
    Q = grid.quantize(traj.values.float())
    return layer_loss(W, Q, H)


if __name__ == "__main__":
    sys.exit(main())
