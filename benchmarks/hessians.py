"""Hessian collection speed on a real model: one forward pass vs the forward with every layer hooked.

Usage: python benchmarks/hessians.py [--model efficientnet-lite0] [--samples 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="efficientnet-lite0")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from obcompress.model.calibration import calibration_batches, collect_hessians, run_model
    from obcompress.model.layers import find_layers
    from obcompress.zoo.registry import ZOO

    entry = ZOO[args.model](num_calibration=args.samples)
    batches = calibration_batches(entry.calibration, args.samples)
    layers = find_layers(entry.model)
    t0 = time.perf_counter()
    with torch.no_grad():
        for b in batches:
            run_model(entry.model, b)
    forward = time.perf_counter() - t0
    t0 = time.perf_counter()
    collect_hessians(entry.model, layers, batches)
    collect = time.perf_counter() - t0
    print(f"| {args.model} | {args.samples} | {len(layers)} | {args.threads} | {forward:.2f} | {collect:.2f} | "
          f"{collect / forward:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
