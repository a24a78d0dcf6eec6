"""Benchmark of the layer solvers on the shared benchmark layers, next to the reference figures.

For each layer in ../shared/bench/layers/*.safetensors (keys W float32 rows x cols, H float64, JSON
metadata under 'meta') and each solver, prints one markdown table per layer and row set: seconds with
1 and 2 threads, peak memory, loss, loss relative to RTN / magnitude, the reference's seconds and loss
on the same rows (REFERENCE.md section 2, see benchmarks/reference_figures.py), speed-ups against the
reference (default and tuned allocator), and the achieved GFLOP/s of the exact solvers as a share of a
same-run torch.mm.

Every (layer, solver, threads) measurement runs in a fresh subprocess:
    python benchmarks/solvers.py --one LAYER SOLVER THREADS --rows R
which prints one JSON line; the parent collects them.

Usage:
    python benchmarks/solvers.py                       # everything, threads 1 and 2, reference rows
    python benchmarks/solvers.py --quick               # smoke test: small layers, 1 thread
    python benchmarks/solvers.py --layers digits_fc1,syn_256x576 --solvers obq,obs50 --threads 1
    python benchmarks/solvers.py --rows-policy full --markdown out.md --json out.json
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import math
import os
import platform
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import reference_figures as rf  # noqa: E402

DEFAULT_LAYERS_DIR = os.path.normpath(os.path.join(REPO, "..", "shared", "bench", "layers"))

# id -> (label, kind, baseline id used for the loss ratio)
SOLVERS: Dict[str, Tuple[str, str, str]] = {
    "rtn": ("RTN w4", "quant", "rtn"),
    "gptq": ("GPTQ w4", "quant", "rtn"),
    "gptq_act": ("GPTQ w4 act-order", "quant", "rtn"),
    "obq": ("OBQ w4", "quant", "rtn"),
    "mag50": ("magnitude 50%", "prune", "mag50"),
    "sgpt50": ("SparseGPT 50%", "prune", "mag50"),
    "obs50": ("ExactOBS 50%", "prune", "mag50"),
    "mag24": ("magnitude 2:4", "prune", "mag24"),
    "sgpt24": ("SparseGPT 2:4", "prune", "mag24"),
    "obs24": ("ExactOBS 2:4", "prune", "mag24"),
    "obs_b4": ("ExactOBS block:4 50%", "prune", "mag_b4"),
    "joint24": ("ExactOBS 2:4 + OBQ w4", "joint", "mag24_rtn"),
}
BASELINE_LABELS = {
    "rtn": "RTN",
    "mag50": "mag 50%",
    "mag24": "mag 2:4",
    "mag_b4": "mag block:4 50%",
    "mag24_rtn": "mag 2:4 + RTN",
}
# Exact greedy solvers: the ones whose work is ~rows*cols^3/3 multiply-adds.
EXACT = ("obq", "obs50", "obs24", "obs_b4", "joint24")
QUICK_SOLVERS = tuple(SOLVERS)  # on the quick layers every solver is fast
QUICK_MAX_WORK = 2e8  # rows * cols^3 of the layers --quick keeps (digits_conv1, digits_fc2)
EXACT_DAMP = 0.0  # the OBC reference's default
GPTQ_DAMP = 0.01
BLOCK_SIZE = 128
BITS = 4
WARMUP_IF_BELOW_S = 1.0
REPEAT_BUDGET_S = 2.0
MAX_REPEATS = 5


# ----------------------------------------------------------------------------------------------
# layers


def discover_layers(layers_dir: str) -> Dict[str, dict]:
    """name -> {file, rows, cols, meta, col_limit, row_limit}; includes the virtual scal_32xD layers."""
    from safetensors import safe_open

    layers = {}
    for path in sorted(glob.glob(os.path.join(layers_dir, "*.safetensors"))):
        name = os.path.splitext(os.path.basename(path))[0]
        with safe_open(path, "pt") as f:
            md = f.metadata() or {}
            rows, cols = f.get_slice("W").get_shape()
        meta = json.loads(md.get("meta", "{}"))
        layers[name] = dict(file=path, rows=rows, cols=cols, meta=meta, col_limit=None, row_limit=None)
    for vname, (src, vrows, vcols) in rf.VIRTUAL.items():
        if src in layers and vcols <= layers[src]["cols"]:
            s = layers[src]
            layers[vname] = dict(file=s["file"], rows=min(vrows, s["rows"]), cols=vcols,
                                 meta={"type": "linear", "virtual_of": src}, col_limit=vcols,
                                 row_limit=vrows)
    return layers


def columns_last_of(layer: dict) -> Optional[int]:
    """kh*kw for a conv weight (4-D weight_shape) whose columns are all present, else None."""
    shape = layer["meta"].get("weight_shape")
    if layer["col_limit"] is None and shape and len(shape) == 4:
        k = int(shape[2]) * int(shape[3])
        return k if k > 1 else None
    return None


def plan_rows(name: str, layer: dict, solver: str, policy: str) -> List[int]:
    """Row counts at which (layer, solver) runs. 'reference': the reference's row subsets."""
    full = layer["rows"]
    if policy == "full":
        return [full]
    with_figs = [r for r in rf.reference_rows(name, solver) if r <= full]
    if with_figs:
        return with_figs
    any_rows = [r for r in rf.reference_rows(name) if r <= full]
    if not any_rows:
        return [full]
    if solver in EXACT:
        # the rows the reference could afford for its exact solvers on this layer
        return [min(any_rows)]
    return sorted(set(any_rows))


# ----------------------------------------------------------------------------------------------
# child: one measurement


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _mm_gflops(cols: int, seconds_budget: float = 0.5) -> float:
    """Best torch.mm GFLOP/s for a cols x cols float32 product at the current thread count."""
    import torch

    n = max(int(cols), 1)
    A = torch.randn(n, n)
    B = torch.randn(n, n)
    C = torch.empty(n, n)
    torch.mm(A, B, out=C)
    best = float("inf")
    t_end = time.perf_counter() + seconds_budget
    reps = 0
    while reps < 5 or (time.perf_counter() < t_end and reps < 10000):
        t0 = time.perf_counter()
        torch.mm(A, B, out=C)
        best = min(best, time.perf_counter() - t0)
        reps += 1
    return 2.0 * n ** 3 / best / 1e9


def _work_flops(solver: str, rows: int, cols: int) -> float:
    """Nominal flops of an exact solver: 2 * rows * (sum over eliminations of the live size^2).

    Full elimination (OBQ, ExactOBS database, blocks) ~ rows*cols^3/3 multiply-adds. 2:4 stops at
    half the columns: (cols^3 - (cols/2)^3)/3; joint 2:4 + OBQ adds the quantization of the kept
    half, which brings it back to cols^3/3.
    """
    if solver == "obs24":
        return 2.0 * rows * (cols ** 3 - (cols / 2) ** 3) / 3.0
    return 2.0 * rows * cols ** 3 / 3.0


def _make_runner(solver: str, W, H, columns_last):
    """A zero-argument callable running ``solver`` once, returning (SolverResult, extra info)."""
    from obcompress.solvers.baselines import magnitude_prune, rtn_quantize
    from obcompress.solvers.gptq import gptq_quantize, sparsegpt_prune
    from obcompress.solvers.grid import QuantGrid
    from obcompress.solvers.obq import obq_quantize
    from obcompress.solvers.obs import exact_obs_database

    grid = QuantGrid.fit(W, BITS)
    cl = columns_last

    def obs(structure, sparsity):
        db = exact_obs_database(W, H, structure, columns_last=cl, damp=EXACT_DAMP)
        res = db.at(sparsity)
        return res, {"db_nbytes": int(db.nbytes)}

    def joint():
        t0 = time.perf_counter()
        db = exact_obs_database(W, H, "2:4", columns_last=cl, damp=EXACT_DAMP)
        mask = db.at(None).mask
        t1 = time.perf_counter()
        res = obq_quantize(W, H, grid, mask=mask, damp=EXACT_DAMP)
        return res, {"mask_seconds": t1 - t0, "obq_seconds": time.perf_counter() - t1}

    runners = {
        "rtn": lambda: (rtn_quantize(W, grid, H=H), {}),
        "gptq": lambda: (gptq_quantize(W, H, grid, block_size=BLOCK_SIZE, damp=GPTQ_DAMP), {}),
        "gptq_act": lambda: (gptq_quantize(W, H, grid, block_size=BLOCK_SIZE, act_order=True,
                                           damp=GPTQ_DAMP), {}),
        "obq": lambda: (obq_quantize(W, H, grid, damp=EXACT_DAMP), {}),
        "mag50": lambda: (magnitude_prune(W, 0.5, H=H), {}),
        "sgpt50": lambda: (sparsegpt_prune(W, H, 0.5, block_size=BLOCK_SIZE, damp=GPTQ_DAMP), {}),
        "obs50": lambda: obs("unstructured", 0.5),
        "mag24": lambda: (magnitude_prune(W, None, "2:4", H=H, columns_last=cl), {}),
        "sgpt24": lambda: (sparsegpt_prune(W, H, None, "2:4", block_size=BLOCK_SIZE, damp=GPTQ_DAMP,
                                           columns_last=cl), {}),
        "obs24": lambda: obs("2:4", None),
        "obs_b4": lambda: obs("block:4", 0.5),
        "joint24": joint,
    }
    return runners[solver]


def _baseline_loss(base: str, W, H, columns_last) -> float:
    from obcompress.solvers._common import layer_loss
    from obcompress.solvers.baselines import magnitude_prune, rtn_quantize
    from obcompress.solvers.grid import QuantGrid

    grid = QuantGrid.fit(W, BITS)
    if base == "rtn":
        return rtn_quantize(W, grid, H=H).loss
    if base == "mag50":
        return magnitude_prune(W, 0.5, H=H).loss
    if base == "mag24":
        return magnitude_prune(W, None, "2:4", H=H, columns_last=columns_last).loss
    if base == "mag_b4":
        return magnitude_prune(W, 0.5, "block:4", H=H, columns_last=columns_last).loss
    if base == "mag24_rtn":
        mask = magnitude_prune(W, None, "2:4", columns_last=columns_last).mask
        return layer_loss(W, grid.quantize(W) * mask, H)
    raise KeyError(base)


def run_one(layer_name: str, solver: str, threads: int, rows: Optional[int], layers_dir: str) -> dict:
    """Measure one (layer, solver, threads) in this process; returns the JSON-able record."""
    import resource

    import torch
    from safetensors.torch import load_file

    torch.set_num_threads(threads)
    out = {"layer": layer_name, "solver": solver, "threads": threads, "torch_threads": torch.get_num_threads()}
    layers = discover_layers(layers_dir)
    if layer_name not in layers:
        raise ValueError(f"no layer {layer_name!r} in {layers_dir}")
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; one of {', '.join(SOLVERS)}")
    lay = layers[layer_name]
    t = load_file(lay["file"])
    W, H = t["W"].to(torch.float32), t["H"].to(torch.float64)
    del t
    nrows = lay["rows"] if rows is None else min(int(rows), lay["rows"])
    ncols = lay["cols"]
    W = W[:nrows, :ncols].contiguous()
    H = H[:ncols, :ncols].contiguous()
    cl = columns_last_of(lay)
    out.update(rows=nrows, cols=ncols, columns_last=cl)
    run = _make_runner(solver, W, H, cl)
    # touch BLAS / LAPACK once so their lazy set-up is not counted as the solver's memory
    _e = torch.eye(8, dtype=torch.float64)
    torch.cholesky_inverse(torch.linalg.cholesky(_e @ _e + _e))
    torch.mm(_e.float(), _e.float())

    rss0 = _rss_bytes()
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    res, extra = run()
    first = time.perf_counter() - t0
    times = [first]
    if first < WARMUP_IF_BELOW_S:
        # the first call was cheap: count it as the warm-up and time a few more
        times = []
        t_budget = time.perf_counter() + REPEAT_BUDGET_S
        while not times or (len(times) < MAX_REPEATS and time.perf_counter() < t_budget):
            t0 = time.perf_counter()
            res, extra = run()
            times.append(time.perf_counter() - t0)
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    peak = max(0, _maxrss_bytes() - rss0)
    seconds = min(times)
    cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    out.update(seconds=seconds, times=times, warmup=first < WARMUP_IF_BELOW_S, first_seconds=first,
               cpu_seconds_total=cpu, peak_bytes=peak, loss=float(res.loss), damp=float(res.damp))
    if res.mask is not None:
        out["sparsity"] = float(res.sparsity)
    pred = (res.info or {}).get("predicted_loss")
    if pred is not None:
        out["predicted_loss"] = float(pred)
    out.update(extra)
    if "db_nbytes" in out:
        out["ref_db_nbytes"] = (ncols + 1) * nrows * ncols * 4  # reference trace: float32
    out["baseline"] = SOLVERS[solver][2]
    out["baseline_loss"] = float(_baseline_loss(SOLVERS[solver][2], W, H, cl))
    if solver in EXACT:
        out["work_flops"] = _work_flops(solver, nrows, ncols)
        out["gflops"] = out["work_flops"] / seconds / 1e9
        out["mm_gflops"] = _mm_gflops(ncols)
    return out


# ----------------------------------------------------------------------------------------------
# parent


def measure(layer: str, solver: str, threads: int, rows: int, layers_dir: str, timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--one", layer, solver, str(threads),
           "--rows", str(rows), "--layers-dir", layers_dir]
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    base = {"layer": layer, "solver": solver, "threads": threads, "rows": rows}
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {**base, "error": f"timeout after {timeout:g} s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if lines:
        try:
            return {**base, **json.loads(lines[-1])}
        except json.JSONDecodeError:
            pass
    tail = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
    return {**base, "error": f"exit {p.returncode}: {tail}"}


def _g(x: Optional[float], digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if x == 0:
        return "0"
    return f"{x:.{digits}g}"


def _secs(x: Optional[float]) -> str:
    if x is None:
        return "-"
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def _x(x: Optional[float]) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:.3g}x" if x < 1000 else f"{x:.0f}x"


def _esc(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def build_tables(results: List[dict], layers: Dict[str, dict], threads: List[int]) -> str:
    """One markdown table per (layer, rows), then the database-memory table and footnotes."""
    by_key: Dict[tuple, Dict[int, dict]] = {}
    order: List[tuple] = []
    for r in results:
        k = (r["layer"], r["rows"], r["solver"])
        if k not in by_key:
            by_key[k] = {}
            order.append(k)
        by_key[k][r["threads"]] = r

    groups: Dict[tuple, List[str]] = {}
    for layer, rows, solver in order:
        groups.setdefault((layer, rows), []).append(solver)

    th_cols = [f"s ({t} thr)" for t in threads]
    gf_cols = [f"GFLOP/s ({t} thr) / % mm" for t in threads]
    head = (["layer", "rows x cols", "solver"] + th_cols
            + ["peak MB", "loss", "÷ baseline", "ref s", "ref loss", "loss ÷ ref", "speed-up vs ref",
               "vs ref tuned"] + gf_cols)
    out = []
    db_rows = []
    for (layer, rows), solvers in groups.items():
        cols = layers[layer]["cols"] if layer in layers else "?"
        sub = "" if layer not in layers or rows == layers[layer]["rows"] else f" (first {rows} of {layers[layer]['rows']} rows)"
        out.append(f"### {layer}: {rows} x {cols}{sub}\n")
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + "|")
        for solver in solvers:
            per_t = by_key[(layer, rows, solver)]
            label = SOLVERS[solver][0]
            ok = {t: r for t, r in per_t.items() if "error" not in r}
            errs = {t: r["error"] for t, r in per_t.items() if "error" in r}
            ref = rf.reference(layer, rows, solver)
            tuned = rf.reference_tuned(layer, rows, solver)
            fail = rf.REFERENCE_FAILURES.get((layer, rows, solver))
            ref_s, ref_loss = ref if ref else (None, None)
            cells = [layer, f"{rows} x {cols}", label]
            shown = set()
            for t in threads:
                if t in ok:
                    cells.append(_secs(ok[t]["seconds"]))
                elif t in errs:
                    # the same failure at every thread count is spelled out once
                    cells.append("same error" if errs[t] in shown else "error: " + _esc(errs[t]))
                    shown.add(errs[t])
                else:
                    cells.append("-")
            if not ok:
                cells += ["-"] * 3
            else:
                first = ok[min(ok)]
                peak = max(r["peak_bytes"] for r in ok.values()) / 2 ** 20
                losses = [r["loss"] for r in ok.values()]
                loss = first["loss"]
                # a loss that differs between thread counts is worth a flag
                flag = "*" if max(losses) - min(losses) > 1e-6 * max(abs(loss), 1e-30) else ""
                base = first.get("baseline_loss")
                cells += [f"{peak:.1f}", _g(loss) + flag, _g(loss / base if base else None, 3)]
            cells += [_secs(ref_s), _g(ref_loss) if ref_loss is not None else (_esc(fail) if fail else "-")]
            one = ok.get(1)
            loss_ratio = ok[min(ok)]["loss"] / ref_loss if ok and ref_loss else None
            cells.append(_g(loss_ratio, 4))
            cells.append(_x(ref_s / one["seconds"]) if one and ref_s and one["seconds"] > 0 else "-")
            cells.append(_x(tuned / one["seconds"]) if one and tuned and one["seconds"] > 0 else "-")
            for t in threads:
                r = ok.get(t)
                if r and "gflops" in r:
                    cells.append(f"{r['gflops']:.3g} / {100 * r['gflops'] / r['mm_gflops']:.0f}%"
                                 f" (mm {r['mm_gflops']:.3g})")
                else:
                    cells.append("-")
            out.append("| " + " | ".join(cells) + " |")
            for r in ok.values():
                if "db_nbytes" in r and r["threads"] == min(ok):
                    db_rows.append((layer, rows, cols, label, r["db_nbytes"], r["ref_db_nbytes"]))
        out.append("")

    if db_rows:
        out.append("### ExactOBS layer database memory\n")
        out.append("| layer | rows x cols | solver | database (orders + losses) MB | reference trace (cols+1)·rows·cols fp32 MB | ratio |")
        out.append("|---|---|---|---:|---:|---:|")
        for layer, rows, cols, label, nb, ref in db_rows:
            out.append(f"| {layer} | {rows} x {cols} | {label} | {nb / 2 ** 20:.3g} | {ref / 2 ** 20:.3g} | {ref / nb:.0f}x smaller |")
        out.append("")
    return "\n".join(out)


FOOTNOTES = """\
Notes: seconds = best wall time (time.perf_counter) of the solver call in a fresh process with
torch.set_num_threads(threads); a call under 1 s is run once first as a warm-up and then timed up to
5 times. peak MB = ru_maxrss after the calls minus the RSS before them (what the solver added).
÷ baseline: loss over RTN w4 (quantization), magnitude with the same structure (pruning; block:4 over
magnitude block:4), magnitude 2:4 then RTN (joint). ref = REFERENCE.md section 2 on exactly the same
rows (benchmarks/reference_figures.py); speed-ups use the 1-thread time; "vs ref tuned" is the
reference with MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ raised. GFLOP/s of the exact solvers =
nominal work / seconds, work = 2·rows·cols³/3 flops (ExactOBS 2:4: 2·rows·(cols³ − (cols/2)³)/3), as
a % of torch.mm on a cols x cols float32 product measured in the same process and thread count.
Settings: per-channel symmetric 4-bit grid QuantGrid.fit(W, 4); ExactOBS/OBQ damp=0; GPTQ/SparseGPT
damp=0.01, block 128; 2:4 and block:4 on conv layers with columns_last = kh·kw. * = the loss differs
between thread counts.
"""


def machine_line() -> str:
    import torch

    from obcompress.search.costs import cpu_model

    cpu = cpu_model()
    return (f"Run {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}, "
            f"{cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}.")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers-dir", default=DEFAULT_LAYERS_DIR, help="folder of <layer>.safetensors (default: %(default)s)")
    ap.add_argument("--layers", default=None, help="comma-separated layer names (default: all found)")
    ap.add_argument("--solvers", default=None, help=f"comma-separated solver ids: {','.join(SOLVERS)}")
    ap.add_argument("--threads", default=None, help="comma-separated thread counts (default 1,2; --quick: 1)")
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke test: only layers with rows*cols^3 <= {QUICK_MAX_WORK:g}, 1 thread")
    ap.add_argument("--rows-policy", choices=("reference", "full"), default="reference",
                    help="reference: the reference's row subsets so figures compare; full: all rows")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per measurement (default %(default)s)")
    ap.add_argument("--markdown", metavar="FILE", help="also write the tables to FILE")
    ap.add_argument("--json", metavar="FILE", help="also write the raw measurements to FILE")
    ap.add_argument("--list", action="store_true", help="print the measurements planned and exit")
    ap.add_argument("--one", nargs=3, metavar=("LAYER", "SOLVER", "THREADS"), help=argparse.SUPPRESS)
    ap.add_argument("--rows", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    layers_dir = os.path.abspath(args.layers_dir)

    if args.one:
        layer, solver, threads = args.one
        try:
            rec = run_one(layer, solver, int(threads), args.rows, layers_dir)
        except Exception as e:  # reported as a table cell by the parent, never a crash
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            rec = {"layer": layer, "solver": solver, "threads": int(threads),
                   "error": f"{type(e).__name__}: {msg}"[:300]}
        print(json.dumps(rec), flush=True)
        return 0

    layers = discover_layers(layers_dir)
    if not layers:
        print(f"no layers found in {layers_dir}", file=sys.stderr)
        return 2
    names = list(layers)
    if args.layers:
        want = [s.strip() for s in args.layers.split(",") if s.strip()]
        missing = [n for n in want if n not in layers]
        if missing:
            print(f"unknown layers {missing}; found {names}", file=sys.stderr)
            return 2
        names = want
    solvers = list(SOLVERS)
    if args.solvers:
        solvers = [s.strip() for s in args.solvers.split(",") if s.strip()]
        bad = [s for s in solvers if s not in SOLVERS]
        if bad:
            print(f"unknown solvers {bad}; use {list(SOLVERS)}", file=sys.stderr)
            return 2
    threads_arg = args.threads or ("1" if args.quick else "1,2")
    threads = sorted({int(t) for t in threads_arg.split(",") if t.strip()})
    if args.quick:
        if not args.layers:
            names = [n for n in names if layers[n]["rows"] * layers[n]["cols"] ** 3 <= QUICK_MAX_WORK]
        solvers = [s for s in solvers if s in QUICK_SOLVERS]
    # big layers last, so that a partial run still shows the small ones
    names.sort(key=lambda n: layers[n]["rows"] * layers[n]["cols"] ** 3)

    plan = []
    for n in names:
        for s in solvers:
            for r in plan_rows(n, layers[n], s, args.rows_policy):
                for t in threads:
                    plan.append((n, s, r, t))
    if args.list:
        for n, s, r, t in plan:
            print(f"{n} rows={r} cols={layers[n]['cols']} {s} threads={t}")
        print(f"{len(plan)} measurements", file=sys.stderr)
        return 0
    results = []
    t_start = time.perf_counter()
    for i, (n, s, r, t) in enumerate(plan, 1):
        rec = measure(n, s, t, r, layers_dir, args.timeout)
        results.append(rec)
        what = rec.get("error") or f"{rec['seconds']:.4g} s, loss {rec['loss']:.5g}"
        print(f"[{i}/{len(plan)}] {n} rows={r} {s} threads={t}: {what}", file=sys.stderr, flush=True)

    text = (machine_line() + f" Wall time of the benchmark: {time.perf_counter() - t_start:.0f} s.\n\n"
            + build_tables(results, layers, threads) + "\n" + FOOTNOTES)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
