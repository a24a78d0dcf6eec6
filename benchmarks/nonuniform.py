"""Non-uniform compression benchmark: uniform vs DP vs SPDY at BOPs and size goals on the zoo models.

For each model: build (or resume) its database under --db-root (the build time and size on disk
are reported), then for every goal evaluate the best uniform setting (the most accurate of the
three feasible uniform settings of lowest total layer error), the DP over the layer errors, and
SPDY, each stitched into the model from the database. Goals are reductions of the searched
layers' BOPs (MACs x density x weight bits x activation bits; the dense reference is 16-bit float
weights and activations, and a quantized layer's activations count --activation-bits, 8 by
default) and of their weights' bits on disk (the fp32 weights as reference). The accuracy is that
of the stitched weights; activation rounding is in the recipes written, not in this evaluation.

Usage:
    python benchmarks/nonuniform.py --models digits-cnn                      # minutes
    python benchmarks/nonuniform.py --models efficientnet-lite0 --threads 2 --markdown out.md
    python benchmarks/nonuniform.py --models minilm --space small            # the reduced space
Rows are appended to --markdown as they finish; the database resumes if the run is stopped.
"""

from __future__ import annotations

import argparse
import json
import datetime
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch

GOALS = ("bops=1/4", "bops=1/8", "bops=1/12", "size=1/4", "size=1/8", "size=1/16")


def small_space():
    """A reduced space for large models on two cores: 8 unstructured levels, 2:4, four bit widths,
    2:4 and two unstructured levels joint with them."""
    from obcompress.search import SearchSpace, Variant, paper_levels

    lv = paper_levels(0.99)
    levels = [lv[k - 1] for k in (2, 4, 7, 10, 13, 16, 22, 29)]
    out = [Variant("unstructured", s) for s in levels] + [Variant("2:4")]
    bits = (8, 4, 3, 2)
    out += [Variant(bits=b) for b in bits] + [Variant("2:4", bits=b) for b in bits]
    out += [Variant("unstructured", lv[k - 1], b) for k in (4, 7) for b in bits]
    return SearchSpace(tuple(out))


def sweep_table(doc, out, correction: str) -> str:
    """The markdown table of a sweep document (``sweep.json``)."""
    metric = doc["metric"]
    # minilm: the embeddings' cosine to the dense ones says more than the fixed classifier's accuracy.
    extra = [k for k in ("cosine_mean", "cosine_min", "agreement") if k in doc["dense"]]
    table = [f"dense {metric}: {100 * doc['dense'][metric]:.1f} %; correction: {correction}; sweep and plots in `{out}` "
             f"(`obcompress report {out}`)\n",
             "| goal | method | " + metric + " | " + " | ".join(extra) + (" | " if extra else "") +
             "reached | total layer error | seconds | chosen (uniform) |",
             "|---" * (7 + len(extra)) + "|"]
    for r in doc["runs"]:
        g = r["goal"]
        cells = "".join(f"{r['metrics'][k]:.4f} | " for k in extra)
        table.append(f"| {g['cost']['name']} {g['reduction']:g}x | {r['method']} | "
                     f"{100 * r['metrics'][metric]:.1f} | {cells}{r['reduction']:.2f}x | {r['score']:.4g} | "
                     f"{r['seconds']:.1f} | {r['info'].get('variant', '')} |")
    return "\n".join(table)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="efficientnet-lite0,minilm")
    ap.add_argument("--goals", default=",".join(GOALS))
    ap.add_argument("--methods", default="uniform,dp,spdy")
    ap.add_argument("--space", choices=("default", "small"), default="default")
    ap.add_argument("--db-root", default=None, help="where databases live (default: the user cache)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--calibration-samples", type=int, default=None)
    ap.add_argument("--spdy-restarts", type=int, default=8)
    ap.add_argument("--spdy-steps", type=int, default=40)
    ap.add_argument("--spdy-samples", type=int, default=64)
    ap.add_argument("--activation-bits", type=int, default=8)
    ap.add_argument("--correction", choices=("none", "bn", "statcorr"), default="none",
                    help="run on every evaluated configuration (statcorr: statistics correction toward the dense model)")
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--table", default=None, metavar="SWEEPDIR",
                    help="only print the table of a sweep written before (its sweep.json), then exit")
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from obcompress.files import cache_dir
    from obcompress.search import default_space
    from obcompress.search.database import build_database
    from obcompress.search.nonuniform import parse_goal, select_dp
    from obcompress.search.sweep import run_sweep
    from obcompress.zoo.registry import ZOO

    if args.table:
        doc = json.loads((Path(args.table) / "sweep.json").read_text())
        print(sweep_table(doc, args.table, doc.get("correction", "none")))
        return 0
    root = Path(args.db_root) if args.db_root else cache_dir() / "databases"
    space = default_space() if args.space == "default" else small_space()
    goals = [g for g in args.goals.split(",") if g]
    methods = [m for m in args.methods.split(",") if m]
    md = Path(args.markdown) if args.markdown else None
    if md:
        with md.open("a") as f:
            f.write(f"\n## nonuniform run of {datetime.datetime.now().isoformat(timespec='seconds')} "
                    f"({platform.node()}, {torch.get_num_threads()} threads, torch {torch.__version__})\n\n"
                    f"`{shlex.join([sys.executable] + sys.argv)}`\n\n")
    for name in [m for m in args.models.split(",") if m]:
        opts = {}
        if args.calibration_samples:
            opts["num_calibration"] = args.calibration_samples
        entry = ZOO[name](**opts)
        samples = args.calibration_samples or {"digits-cnn": 512, "efficientnet-lite0": 256, "minilm": 128}[name]
        ignore = ["re:pooler\\..*"] if name == "minilm" else []
        dbdir = root / f"{name}-{args.space}"
        t0 = time.perf_counter()
        db = build_database(entry.model, entry.calibration, dbdir, space, num_calibration_samples=samples,
                            ignore=ignore, progress=args.progress)
        wall = time.perf_counter() - t0
        line = (f"{name}: database {len(db.layers)} layers, {sum(len(e.variants) for e in db.layers.values())} "
                f"variants, {db.nbytes / 2**20:.1f} MiB on disk, build {db.build_seconds:.0f} s "
                f"(Hessians {db.manifest.get('hessian_seconds', 0):.0f} s; this call {wall:.0f} s)")
        print(line, flush=True)
        if md:
            with md.open("a") as f:
                f.write(f"{line}\n\n")
        if args.build_only:
            continue
        out = dbdir.parent / (f"{name}-{args.space}-sweep" + ("" if args.correction == "none" else f"-{args.correction}"))

        def log(msg):
            print(f"  {msg}", flush=True)

        reachable = []
        for g in goals:
            try:
                select_dp(db, parse_goal(g, **({"activation_bits": args.activation_bits}
                                               if g.startswith("bops") and args.activation_bits else {})))
                reachable.append(g)
            except ValueError as e:  # the space cannot reach it: say so, and sweep the others
                line = f"{name}: goal {g} skipped: {str(e).split(': ')[-1]}"
                print(line, flush=True)
                if md:
                    with md.open("a") as f:
                        f.write(f"{line}\n\n")
        doc = run_sweep(db, entry.model, entry.calibration, entry.evaluate, reachable, out, methods=methods,
                        activation_bits=args.activation_bits or None, spdy_restarts=args.spdy_restarts,
                        spdy_steps=args.spdy_steps, spdy_samples=args.spdy_samples,
                        num_calibration_samples=samples, correction=args.correction, progress=args.progress, log=log)
        text = sweep_table(doc, out, args.correction)
        print(text, flush=True)
        if md:
            with md.open("a") as f:
                f.write(f"### {name}\n\n{text}\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
