"""FITCompress benchmark: FITCompress as defined, applied by round to nearest (a), (a) after a short
fine-tune, and through the OBC solvers (b); beside it the DP over the OBC database with three scores
(the normalised layer error, the calibration loss of single-layer swaps, and FIT: sum F (theta -
theta_hat)^2 of each variant's weights; with its default cap on the layer-wise error,
``FIT_MAX_LAYER_ERROR``, and without) and the best uniform setting, at size goals 1/8, 1/12,
1/16 and BOPs goals 1/8, 1/12. One table per model.

One Fisher per model (the reference's estimate: 100 batches, one pass at most over the labelled
calibration data), kept beside the database (``fisher.safetensors``), serves the path's start and
the FIT scores; the path re-estimates it at every expanded node from 20 batches (the reference's
approximate mode). The zoo's calibration sets carry no labels: each input is labelled by the dense
model's top-1; minilm's Fisher is its FisherTask's (the fixed dense classifier's cross-entropy on
labelled training reviews). BOPs goals are evaluated as costed: every configuration with the
recipe's 8-bit input quantizers.

Every cell is stored in ``<db>/fitcompress-bench.json`` (the FITCompress columns) or
``<db>/fitcompress-bench-dp.json`` (the database's) as it is measured and skipped when the script
runs again (``--redo`` measures again), so a run can be stopped and resumed, and the FIT columns
can be measured while a database is still being built (``--columns fit``), or beside the DP
columns (``--columns dp``) in another process.

Usage:
    python benchmarks/fitcompress.py --models digits-cnn
    python benchmarks/fitcompress.py --models efficientnet-lite0 --columns fit --finetune-epochs 3
    python benchmarks/fitcompress.py --models efficientnet-lite0 --columns dp
    python benchmarks/fitcompress.py --models efficientnet-lite0 --table
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

GOALS = ("size=1/8", "size=1/12", "size=1/16", "bops=1/8", "bops=1/12")
SPACES = {"digits-cnn": "default", "efficientnet-lite0": "default", "minilm": "reach16"}
SAMPLES = {"digits-cnn": 512, "efficientnet-lite0": 256, "minilm": 128}
FINETUNE_LR = 1e-3
COLUMNS = ("a", "a+ft", "b", "dp-error", "dp-loss", "dp-fit", "dp-fit-nocap", "uniform")


def reach16_space():
    """benchmarks/nonuniform.py's small space plus 74.58 % sparsity joint with 3 and 2 bits: the
    small space stops at 15.8x smaller, short of the size 1/16 goal."""
    from nonuniform import small_space

    from obcompress.search import SearchSpace, Variant, paper_levels

    s = paper_levels(0.99)[13 - 1]
    return SearchSpace(small_space().variants + (Variant("unstructured", s, 3), Variant("unstructured", s, 2)))


class Cells:
    """The measured cells of one model, on disk as they come: the FITCompress columns in one file,
    the database's in another, so that the two can be measured by two processes at once."""

    def __init__(self, directory: Path):
        self.paths = {"fit": directory / "fitcompress-bench.json", "dp": directory / "fitcompress-bench-dp.json"}

    def _read(self, group: str) -> Dict[str, Any]:
        p = self.paths[group]
        return json.loads(p.read_text()) if p.exists() else {}

    @staticmethod
    def group(col: str) -> str:
        return "dp" if col.startswith("dp") or col in ("uniform", "fit_scores", "loss_scores", "score_agreement") \
            else "fit"

    def columns(self, goal: str) -> List[str]:
        return [c for group in self.paths for c in self._read(group).get(goal, {})]

    def get(self, goal: str, col: str) -> Optional[Dict[str, Any]]:
        return self._read(self.group(col)).get(goal, {}).get(col)

    def put(self, goal: str, col: str, value: Dict[str, Any]) -> None:
        group = self.group(col)
        doc = self._read(group)
        doc.setdefault(goal, {})[col] = value
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=self.paths[group].parent)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(tmp, self.paths[group])


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="digits-cnn,efficientnet-lite0,minilm")
    ap.add_argument("--goals", default=",".join(GOALS))
    ap.add_argument("--columns", default="fit,dp", help="fit (a, a+ft, b), dp (the DP rows and uniform), or both")
    ap.add_argument("--db-root", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--search", choices=("beam", "astar"), default="beam")
    ap.add_argument("--beam-width", type=int, default=1)
    ap.add_argument("--refresh-batches", type=int, default=20)
    ap.add_argument("--finetune-epochs", type=int, default=3)
    ap.add_argument("--finetune-lr", type=float, default=FINETUNE_LR,
                    help="the fine-tune's Adam learning rate; another than the default is measured and tabulated "
                         "as a column of its own")
    ap.add_argument("--loss-samples", type=int, default=64, help="calibration samples of the calibration-loss scores")
    ap.add_argument("--no-loss-scores", action="store_true",
                    help="leave out the DP with the calibration-loss score (its single-layer swaps are the "
                         "costly part of the DP columns: one evaluation per layer and variant)")
    ap.add_argument("--caps", type=lambda t: [float(x) for x in t.split(",") if x], default=[],
                    help="also the fit-scored DP at these caps on the layer-wise error (e.g. 0.1,0.2,0.3): the "
                         "sweep behind FIT_MAX_LAYER_ERROR, printed as its own table")
    ap.add_argument("--redo", action="store_true", help="measure every cell again")
    ap.add_argument("--table", action="store_true", help="only print the tables of the cells measured so far")
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    sys.path.insert(0, str(Path(__file__).parent))
    from obcompress.files import cache_dir
    from obcompress.search import default_space
    from obcompress.search.database import build_database

    root = Path(args.db_root) if args.db_root else cache_dir() / "databases"
    md = Path(args.markdown) if args.markdown else None
    columns = {c for c in args.columns.split(",") if c}

    def emit(text: str) -> None:
        print(text, flush=True)
        if md:
            with md.open("a") as f:
                f.write(text + "\n")

    emit(f"\n## fitcompress run of {datetime.datetime.now().isoformat(timespec='seconds')} "
         f"({platform.node()}, {torch.get_num_threads()} threads)\n\n`{shlex.join([sys.executable] + sys.argv)}`\n")
    goals = [g for g in args.goals.split(",") if g]
    for name in [m for m in args.models.split(",") if m]:
        space_name = SPACES[name]
        dbdir = root / f"{name}-{space_name}"
        cells = Cells(dbdir) if dbdir.exists() else None
        if not args.table:
            from obcompress.zoo.registry import ZOO

            entry = ZOO[name]()
            if "dp" in columns:
                space = default_space() if space_name == "default" else reach16_space()
                ignore = ["re:pooler\\..*"] if name == "minilm" else []  # as benchmarks/nonuniform.py builds it
                build_database(entry.model, entry.calibration, dbdir, space, num_calibration_samples=SAMPLES[name],
                               ignore=ignore, progress=args.progress)
            dbdir.mkdir(parents=True, exist_ok=True)
            cells = Cells(dbdir)
            measure(name, entry, dbdir, cells, goals, columns, args)
        if cells is not None:
            emit(table(name, cells, goals, args.finetune_epochs))
    return 0


def measure(name: str, entry, dbdir: Path, cells: Cells, goals: List[str], columns, args) -> None:
    from obcompress.model.calibration import calibration_batches
    from obcompress.search.database import load_database
    from obcompress.search.fit_apply import apply_path_rtn, finetune
    from obcompress.search.fit_score import fit_scores
    from obcompress.search.fitcompress import (FISHER_FILE, cached_fisher, cross_entropy, labelled_batches,
                                               run_fitcompress)
    from obcompress.search.nonuniform import SCORE_CALIBRATION, _Stitcher, best_uniform, layer_loss_scores
    from obcompress.search.nonuniform import parse_goal, select_dp
    from obcompress.search.sweep import attach_recipe_activations, main_metric

    samples = SAMPLES[name]
    task = entry.fisher_task() if entry.fisher_task is not None else None
    fmodel, fdata, fevaluate = (task.model, task.data, task.evaluate) if task else entry[:3]
    targets, prefix = (task.targets, task.prefix) if task else (None, "")
    labelled = labelled_batches(fmodel, fdata, samples)
    t = time.perf_counter()
    fisher, hit = cached_fisher(dbdir / FISHER_FILE, fmodel, labelled, loss_fn=cross_entropy, targets=targets)
    cells.put("_", "fisher", {"seconds": None if hit else time.perf_counter() - t, "batches": fisher.batches,
                              "samples": fisher.samples})
    dense = cells.get("_", "dense") or {"metrics": entry.evaluate(entry.model)}
    cells.put("_", "dense", dense)
    metric = main_metric(dense["metrics"])

    def todo(goal: str, col: str) -> bool:
        return args.redo or cells.get(goal, col) is None

    # The fine-tune at another learning rate than the table's is a column of its own.
    ft_col = "a+ft" if args.finetune_lr == FINETUNE_LR else f"a+ft@lr{args.finetune_lr:g}"

    for g in goals:
        goal = parse_goal(g, **({"activation_bits": 8} if g.startswith("bops") else {}))
        act = 8 if goal.cost.name == "bops" else None
        if "fit" in columns and (todo(g, "a") or todo(g, "b") or (args.finetune_epochs and todo(g, ft_col))):
            # The path is searched again for a missing cell; only the missing applications run.
            apply = tuple(a for a, col in (("rtn", "a"), ("obc", "b")) if todo(g, col))
            r = run_fitcompress(fmodel, fdata, goal, evaluate=fevaluate, apply=apply, fisher=fisher,
                                num_calibration_samples=samples, mode=args.search, beam_width=args.beam_width,
                                refresh_batches=args.refresh_batches, activation_bits=act, progress=args.progress)
            p = r["path"]
            info = {"reduction": p.reduction, "steps": len(p.path) - 1, "search_seconds": r["search_seconds"],
                    "level": p.info["level"], "bits": {n: v.bits for n, v in p.choice.items()},
                    "sparsity": {n: v.sparsity for n, v in p.choice.items()}, "g": p.g, "fit": p.fit}
            if "rtn" in apply:
                cells.put(g, "a", {"metrics": r["results"]["rtn"]["metrics"], **info})
            if "obc" in apply:
                cells.put(g, "b", {"metrics": r["results"]["obc"]["metrics"], "seconds": r["results"]["obc"]["seconds"],
                                   "reduction": p.reduction})
            if args.finetune_epochs and todo(g, ft_col):
                m = copy.deepcopy(fmodel)
                t = time.perf_counter()
                masks, grids = apply_path_rtn(m, p)
                finetune(m, labelled, cross_entropy, masks, grids, epochs=args.finetune_epochs, lr=args.finetune_lr)
                if act:
                    attach_recipe_activations(m, p.recipe(activation_bits=act), [x for x, _ in labelled])
                cells.put(g, ft_col, {"metrics": fevaluate(m), "seconds": time.perf_counter() - t,
                                      "epochs": args.finetune_epochs, "lr": args.finetune_lr})
                del m
    if "dp" not in columns:
        return
    db = load_database(dbdir, entry.model)
    t = time.perf_counter()
    kind = fit_scores(db, entry.model, fisher, prefix=prefix, progress=args.progress)
    cells.put("_", "fit_scores", {"kind": kind, "seconds": time.perf_counter() - t})
    # The fit-scored DP with its default cap on the layer-wise error (FIT_MAX_LAYER_ERROR) and without.
    scores = [("dp-error", "error", "auto"), ("dp-loss", SCORE_CALIBRATION, "auto"), ("dp-fit", kind, "auto"),
              ("dp-fit-nocap", kind, None)]
    if args.no_loss_scores:
        scores.pop(1)
    else:
        t = time.perf_counter()
        layer_loss_scores(db, entry.model, entry.calibration, num_samples=args.loss_samples, progress=args.progress)
        cells.put("_", "loss_scores", {"seconds": time.perf_counter() - t, "samples": args.loss_samples})
        cells.put("_", "score_agreement", score_agreement(db, kind, SCORE_CALIBRATION))
    scores += [(f"dp-fit-cap{c:g}", kind, c) for c in args.caps]
    batches = calibration_batches(entry.calibration, samples)
    stitch = _Stitcher(db, entry.model)

    def evaluate_choice(choice, act) -> Dict[str, float]:
        stitch.set(choice)
        hooks = attach_recipe_activations(entry.model, db.recipe(choice, activation_bits=act), batches) if act else None
        try:
            return entry.evaluate(entry.model)
        finally:
            if hooks is not None:
                hooks.remove()

    try:
        for g in goals:
            goal = parse_goal(g, **({"activation_bits": 8} if g.startswith("bops") else {}))
            act = 8 if goal.cost.name == "bops" else None
            for col, score, cap in scores:
                if not todo(g, col):
                    continue
                try:
                    cfg = select_dp(db, goal, score=score, max_layer_error=cap)
                except ValueError as e:  # the database's space cannot reach this goal
                    cells.put(g, col, {"unreachable": str(e).split(": ")[-1]})
                    continue
                cells.put(g, col, {"metrics": evaluate_choice(cfg.choice, act), "reduction": cfg.reduction,
                                   "seconds": cfg.info["seconds"]})
            if todo(g, "uniform"):
                try:
                    cands = best_uniform(db, goal, top=3)
                except ValueError as e:
                    cells.put(g, "uniform", {"unreachable": str(e).split(": ")[-1]})
                    continue
                best = None
                for u in cands:
                    m = evaluate_choice(u.choice, act)
                    if best is None or m[metric] > best["metrics"][metric]:
                        best = {"metrics": m, "variant": u.info["variant"], "reduction": u.reduction}
                cells.put(g, "uniform", best)
    finally:
        stitch.restore()


def score_agreement(db, fit_kind: str, loss_kind: str) -> Dict[str, Any]:
    """How well the DP's additive scores rank the single-layer swaps the way their measured
    calibration loss does: Spearman's rho over every (layer, compressed variant), of the error and
    of the FIT score against the calibration loss."""
    import numpy as np

    rows = [(rec["error"], rec[fit_kind], rec[loss_kind]) for e in db.layers.values()
            for key, rec in e.variants.items() if key != "dense" and fit_kind in rec and loss_kind in rec
            and all(np.isfinite([rec["error"], rec[fit_kind], rec[loss_kind]]))]
    a = np.array(rows)

    def rho(x, y):
        rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
        return float(np.corrcoef(rx, ry)[0, 1])

    return {"pairs": len(rows), "error_vs_loss": rho(a[:, 0], a[:, 2]), "fit_vs_loss": rho(a[:, 1], a[:, 2])}


def table(name: str, cells: Cells, goals: List[str], ft: int) -> str:
    dense = cells.get("_", "dense")
    if dense is None:
        return f"### {name}\n\nnothing measured yet\n"
    from obcompress.search.sweep import main_metric

    metric = main_metric(dense["metrics"])

    def cell(c: Optional[Dict[str, Any]], reduction: bool = False) -> str:
        if c is None:
            return "not run"
        if "unreachable" in c:
            return "unreachable"
        m = c["metrics"]
        text = f"{100 * m[metric]:.1f}" + (f" / {m['cosine_mean']:.3f}" if "cosine_mean" in m else "")
        if c.get("variant"):
            text += f" ({c['variant']})"
        elif reduction and "reduction" in c:
            text += f" ({c['reduction']:.2f}x)"
        return text

    fisher = cells.get("_", "fisher") or {}
    what = f"{metric}" + (" / cosine to dense" if "cosine_mean" in dense["metrics"] else "")
    lines = [f"### {name}", "",
             f"dense {cell(dense)} ({what}); Fisher: {fisher.get('batches')} batches, {fisher.get('samples')} samples",
             "", f"| goal | (a) FITCompress, RTN | (a) + {ft}-epoch fine-tune | (b) FITCompress config + OBC | "
                 "DP, error | DP, calibration loss | DP, fit | DP, fit, no cap | best uniform | FITCompress reached | "
                 "steps | path s |",
             "|---" * 12 + "|"]
    for g in goals:
        a = cells.get(g, "a") or {}
        lines.append(f"| {g} | {cell(cells.get(g, 'a'))} | {cell(cells.get(g, 'a+ft'))} | {cell(cells.get(g, 'b'))} | "
                     f"{cell(cells.get(g, 'dp-error'), True)} | {cell(cells.get(g, 'dp-loss'), True)} | "
                     f"{cell(cells.get(g, 'dp-fit'), True)} | {cell(cells.get(g, 'dp-fit-nocap'), True)} | "
                     f"{cell(cells.get(g, 'uniform'))} | "
                     + (f"{a['reduction']:.2f}x | {a.get('steps', '')} | {a.get('search_seconds', float('nan')):.0f} |"
                        if a else " | | |"))
    caps = sorted({float(c[len("dp-fit-cap"):]) for g in goals for c in cells.columns(g) if c.startswith("dp-fit-cap")})
    if caps:
        lines += ["", "The fit-scored DP at other caps on the layer-wise error (the default cap is "
                      "FIT_MAX_LAYER_ERROR):", "", "| goal | " + " | ".join(f"cap {c:g}" for c in caps)
                  + " | no cap |", "|---" * (len(caps) + 2) + "|"]
        for g in goals:
            lines.append(f"| {g} | " + " | ".join(cell(cells.get(g, f"dp-fit-cap{c:g}")) for c in caps)
                         + f" | {cell(cells.get(g, 'dp-fit-nocap'))} |")
    lrs = sorted({float(c[len("a+ft@lr"):]) for g in goals for c in cells.columns(g) if c.startswith("a+ft@lr")})
    if lrs:
        lines += ["", f"(a) + {ft}-epoch fine-tune at other Adam learning rates:", "",
                  f"| goal | lr {FINETUNE_LR:g} | " + " | ".join(f"lr {r:g}" for r in lrs) + " |",
                  "|---" * (len(lrs) + 2) + "|"]
        for g in goals:
            lines.append(f"| {g} | {cell(cells.get(g, 'a+ft'))} | "
                         + " | ".join(cell(cells.get(g, f"a+ft@lr{r:g}")) for r in lrs) + " |")
    agree = cells.get("_", "score_agreement")
    if agree:
        lines += ["", f"Rank agreement with the calibration-loss score over {agree['pairs']} single-layer swaps "
                      f"(Spearman): error {agree['error_vs_loss']:.3f}, fit {agree['fit_vs_loss']:.3f}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
