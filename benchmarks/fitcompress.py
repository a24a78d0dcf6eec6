"""FITCompress benchmark: (a) RTN + FIT mask, (b) the FIT configuration through the OBC solvers,
the DP over the OBC database, and the best uniform setting, at size goals of 1/8, 1/12, 1/16.
--finetune-epochs E adds a column: (a) after the paper's short straight-through fine-tune on the
labelled calibration data. One Fisher is estimated per model and used for every goal.

The Fisher is estimated on the calibration inputs labelled by the dense model's own top-1 (the
zoo's calibration sets carry no labels); the path is a beam of width 1 (the reference's greedy)
unless --search astar. The DP and uniform rows use the database benchmarks/nonuniform.py builds
(same --db-root and --space); it is built here when missing.

Usage:
    python benchmarks/fitcompress.py --models digits-cnn
    python benchmarks/fitcompress.py --models efficientnet-lite0 --threads 2 --markdown out.md
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch

GOALS = ("size=1/8", "size=1/12", "size=1/16")


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="digits-cnn,efficientnet-lite0")
    ap.add_argument("--goals", default=",".join(GOALS))
    ap.add_argument("--space", choices=("default", "small"), default="default")
    ap.add_argument("--db-root", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--search", choices=("beam", "astar"), default="beam")
    ap.add_argument("--beam-width", type=int, default=1)
    ap.add_argument("--finetune-epochs", type=int, default=0,
                    help="also report (a) after this many epochs of straight-through fine-tuning")
    ap.add_argument("--finetune-lr", type=float, default=1e-4)
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    sys.path.insert(0, str(Path(__file__).parent))
    from nonuniform import small_space

    from obcompress.files import cache_dir
    from obcompress.search import default_space
    from obcompress.search.database import build_database
    from obcompress.search.fit import apply_rtn_fit, empirical_fisher, finetune
    from obcompress.search.fitcompress import _cross_entropy, labelled_batches, run_fitcompress
    from obcompress.search.nonuniform import _Stitcher, best_uniform, parse_goal, select_dp
    from obcompress.search.sweep import main_metric
    from obcompress.zoo.registry import ZOO

    root = Path(args.db_root) if args.db_root else cache_dir() / "databases"
    space = default_space() if args.space == "default" else small_space()
    md = Path(args.markdown) if args.markdown else None
    lines = []

    def emit(text: str) -> None:
        print(text, flush=True)
        lines.append(text)
        if md:
            with md.open("a") as f:
                f.write(text + "\n")

    emit(f"\n## fitcompress run of {datetime.datetime.now().isoformat(timespec='seconds')} "
         f"({platform.node()}, {torch.get_num_threads()} threads)\n\n`{shlex.join([sys.executable] + sys.argv)}`\n")
    for name in [m for m in args.models.split(",") if m]:
        entry = ZOO[name]()
        samples = {"digits-cnn": 512, "efficientnet-lite0": 256, "minilm": 128}[name]
        t0 = time.perf_counter()
        ignore = ["re:pooler\\..*"] if name == "minilm" else []  # as benchmarks/nonuniform.py builds it
        db = build_database(entry.model, entry.calibration, root / f"{name}-{args.space}", space,
                            num_calibration_samples=samples, ignore=ignore, progress=args.progress)
        db_wall = time.perf_counter() - t0
        dense = entry.evaluate(entry.model)
        metric = main_metric(dense)

        def cell(m, metric=metric):
            # minilm: the cosine to the dense embeddings beside the fixed classifier's accuracy.
            return f"{100 * m[metric]:.1f}" + (f" / cos {m['cosine_mean']:.3f}" if "cosine_mean" in m else "")
        emit(f"### {name}\n\ndense {metric} {100 * dense[metric]:.1f}; database {len(db.layers)} layers, "
             f"{db.nbytes / 2**20:.1f} MiB, {db.build_seconds:.0f} s to build (this call {db_wall:.0f} s)\n")
        ft = args.finetune_epochs
        emit("| goal | (a) RTN + FIT mask | " + (f"(a) + {ft}-epoch fine-tune | " if ft else "") +
             "(b) FIT config + OBC | DP over OBC database | best uniform | FIT reached | path s | "
             "(b) compress s | DP s |" + (" fine-tune s |" if ft else ""))
        emit("|---" * (9 + 2 * bool(ft)) + "|")
        stitch = _Stitcher(db, entry.model)
        # minilm's embeddings have no loss: its Fisher sees the fixed dense classifier's cross-entropy
        # on labelled training reviews (the zoo's FisherTask); the others their own logits.
        task = entry.fisher_task() if entry.fisher_task is not None else None
        fmodel, fdata, fevaluate = (task.model, task.data, task.evaluate) if task else entry[:3]
        # One Fisher for every goal (it depends on the model and data only).
        t = time.perf_counter()
        labelled = labelled_batches(fmodel, fdata, samples)
        # Up to every labelled batch once (minilm's are single reviews: 64 batches would be half of them).
        fisher = empirical_fisher(fmodel, labelled, _cross_entropy, layers=task.targets if task else None,
                                  max_batches=max(64, len(labelled)))
        emit(f"Fisher: {time.perf_counter() - t:.1f} s, {fisher.batches} batches of the labelled calibration data "
             f"({fisher.samples} samples, converged: {fisher.converged}), used for every goal\n")
        for g in [x for x in args.goals.split(",") if x]:
            r = run_fitcompress(fmodel, fdata, g, evaluate=fevaluate, apply=("rtn", "obc"),
                                num_calibration_samples=samples, mode=args.search, beam_width=args.beam_width,
                                progress=args.progress, fisher=fisher)
            res = r["results"]
            ft_cells = ""
            if ft:
                m = copy.deepcopy(fmodel)
                t = time.perf_counter()
                masks, grids = apply_rtn_fit(m, r["path"].choice, fisher)
                finetune(m, labelled, _cross_entropy, masks, grids, epochs=ft, lr=args.finetune_lr)
                ft_s = time.perf_counter() - t
                ft_cells = f"{cell(fevaluate(m))} | "
                del m
            goal = parse_goal(g)
            t = time.perf_counter()
            try:
                dp = select_dp(db, goal)
            except ValueError as e:  # the database's space cannot reach this goal
                dp, why = None, str(e).split(": ")[-1]
            dp_s = time.perf_counter() - t
            if dp is not None:
                stitch.set(dp.choice)
                dp_m = entry.evaluate(entry.model)
                best_u, best_v = None, ""
                for u in best_uniform(db, goal, top=3):
                    stitch.set(u.choice)
                    um = entry.evaluate(entry.model)
                    if best_u is None or um[metric] > best_u[metric]:
                        best_u, best_v = um, u.info["variant"]
                stitch.restore()
                dp_cells = f"{cell(dp_m)} ({dp.reduction:.2f}x) | {cell(best_u)} ({best_v})"
            else:
                dp_cells = f"unreachable ({why}) | unreachable"
            emit(f"| {g} | {cell(res['rtn']['metrics'])} | {ft_cells}{cell(res['obc']['metrics'])} | "
                 f"{dp_cells} | {r['path'].reduction:.2f}x | {r['search_seconds']:.2f} | "
                 f"{res['obc']['seconds']:.1f} | {dp_s:.2f} |" + (f" {ft_s:.1f} |" if ft else ""))
        emit("")
    return 0


if __name__ == "__main__":
    sys.exit(main())
