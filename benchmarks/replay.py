"""Single-layer swaps with the prefix replayed (model/replay.py) against full passes.

    python benchmarks/replay.py [--models efficientnet-lite0,minilm] [--samples 32] [--layers 6]
        [--repeats 3] [--threads 1]

For evenly spaced layers of each zoo model's database (one variant each, the database's 6th):
the calibration loss of the model with only that layer swapped, by a full pass and with the
modules ahead of the layer replayed (best of --repeats, interleaved), whether the two losses are
bit-identical, the modules replayed, and the one-off cost of recording a layer's prefix. The
ratio of the summed times over the sampled layers estimates the speed-up of ``layer_loss_scores``
(which records once per layer and then measures every variant). Needs the model's database
under the cache (benchmarks/fitcompress.py builds them).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from fitcompress import SPACES  # the databases that benchmark builds


def interleaved(fns, repeats):
    """Best time and last result of each function, run in turns (a load change hits both)."""
    times, outs = [[] for _ in fns], [None] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            outs[i] = fn()
            times[i].append(time.perf_counter() - t)
    return [min(t) for t in times], outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="efficientnet-lite0,minilm")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from obcompress.files import cache_dir
    from obcompress.model.calibration import calibration_batches
    from obcompress.search.database import load_database
    from obcompress.search.nonuniform import CalibrationLoss, _Stitcher
    from obcompress.search.space import Variant
    from obcompress.zoo.registry import ZOO

    print(f"{args.threads} thread(s), {args.samples} samples, load {os.getloadavg()[0]:.2f}")
    for name in [m for m in args.models.split(",") if m]:
        entry = ZOO[name]()
        dbdir = cache_dir() / "databases" / f"{name}-{SPACES[name]}"
        if not (dbdir / "database.json").exists():
            print(f"\n{name}: no database at {dbdir} (run benchmarks/fitcompress.py --models {name} first)")
            continue
        db = load_database(dbdir, entry.model)
        loss = CalibrationLoss(entry.model, calibration_batches(entry.calibration, args.samples))
        st = _Stitcher(db, entry.model, cache_bytes=0)
        names = db.names
        picks = sorted({round(i * (len(names) - 1) / max(args.layers - 1, 1)) for i in range(args.layers)})
        print(f"\n### {name} ({len(names)} layers)\n")
        print("| layer | position | modules replayed | full pass s | replayed s | ratio | identical | record s |")
        print("|---|---|---|---|---|---|---|---|")
        fulls, reps = [], []
        for i in picks:
            layer = names[i]
            t = time.perf_counter()
            replay = loss.replay(layer)
            record = time.perf_counter() - t
            v = [o for o in db.options(layer) if o.key != "dense"][5]
            st.set({layer: v})
            try:
                (tf, tr), (full, rep) = interleaved([loss, lambda: loss(replay)], args.repeats)
            finally:
                st.set({layer: Variant()})
            fulls.append(tf)
            reps.append(tr)
            print(f"| {layer} | {i + 1}/{len(names)} | {0 if replay is None else len(replay.skipped)} | {tf:.3f} | "
                  f"{tr:.3f} | {tf / tr:.1f}x | {full == rep} | {record:.2f} |")
        print(f"\nspeed-up over these layers (summed times): {sum(fulls) / sum(reps):.1f}x "
              f"(load {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
