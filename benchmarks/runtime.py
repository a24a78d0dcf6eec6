"""Real deployment: ONNX file size and onnxruntime latency of compressed models (issue 6).

For each model (digits-cnn, efficientnet-lite0, minilm) and variant, a fresh dense model is
compressed in place with ``obcompress.api.compress``, saved as an artifact (its bytes on disk) and
exported with ``obcompress.formats.onnx_export`` (the .onnx bytes; W+A exports fold BatchNorm and
prepare convs for onnxruntime's integer kernels, see ``export_onnx(fold_batchnorm=...)``);
onnxruntime then times one forward pass with 1 and 2 intra-op threads at batch 1 and 32, and
evaluates the model in onnxruntime where that is cheap: digits-cnn accuracy on its 500 test
images, efficientnet-lite0 top-1 / top-5 on its 132 labelled photos and "agree", the share of
photos whose top-1 class is the dense fp32 model's in onnxruntime (minilm: none; its evaluation
embeds 1,000 reviews). "sim top1" is the PyTorch simulation of the compressed model on the same
photos. "max abs diff" is the largest difference of the onnxruntime output from the PyTorch model's
on the timing input (batch 1), relative to the largest output. "int convs": the layers whose Conv
the export prepared for integer kernels; "QLinearConv": how many onnxruntime's optimised graph runs.
"folded": a weight-only file timed with its weights dequantized once when the session starts
(``ort_session(fold_weights=True)``): float kernels, the small file kept.

Timing: the machine may be busy, so the variants of a model are timed in the same loop, one run of
each in turn (the order reversed every other round), and the median of --repeats rounds is
reported for each; compare variants within one model's rows only.

Variants:
  dense   fp32, exported as it is
  w8      int8 weights (RTN per channel), float activations
  w8a8    int8 weights + 8-bit asymmetric input quantizers (calibrated, MSE clip) on every layer
  w4      4-bit weights (GPTQ per channel), stored int4
  24w4    2:4 sparsity + 4-bit (SparseGPT), stored int4 with the pruned weights as zero codes;
          layers whose columns do not split into groups of 4 stay dense, 4-bit (GPTQ)
  24w4pw  the same on the layers whose columns split into groups of 4 only (efficientnet: the
          pointwise convs and the classifier); the others (stem, depthwise convs) stay fp32

Sessions are onnxruntime's defaults (its fastest: int8 activations inside MatMulNBits, biases
rounded to int32 for its integer kernels), so the accuracy is what a deployment gets; --exact
uses ``ort_session(exact=True)`` instead, which matches PyTorch to float rounding (and has no
integer conv kernels).

Usage:
    python benchmarks/runtime.py --models digits-cnn                      # a minute
    python benchmarks/runtime.py --markdown benchmarks/RESULTS.md        # everything (long on 2 cores)
    python benchmarks/runtime.py --models minilm --variants dense,w8a8 --threads 2 --batches 1
    python benchmarks/runtime.py --models efficientnet-lite0 --variants dense,w8a8,24w4 --time dense,w8a8
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

MODELS = ("digits-cnn", "efficientnet-lite0", "minilm")
VARIANTS = {
    "dense": ("dense fp32", None),
    "w8": ("int8 weights", {"solver": "rtn", "quantization": {"num_bits": 8}}),
    "w8a8": ("int8 W + 8-bit A", {"solver": "rtn", "quantization": {
        "num_bits": 8, "activations": {"num_bits": 8, "symmetric": False}}}),
    "w4": ("4-bit weights", {"solver": "gptq", "quantization": {"num_bits": 4}}),
    "24w4": ("2:4 + 4-bit", {"solver": "sparsegpt", "sparsity": {"mask_structure": "2:4"},
                             "quantization": {"num_bits": 4}}),
    "24w4pw": ("2:4 + 4-bit, 2:4 layers only", {"solver": "sparsegpt", "sparsity": {"mask_structure": "2:4"},
                                                 "quantization": {"num_bits": 4}}),
}
# variants that leave the layers without 2:4 groups (efficientnet's stem and depthwise convs) float
ONLY_STRUCTURED = ("24w4pw",)
MINILM_TOKENS = 128
FOLDED = "ms t{t} b{b} folded"  # sequence length of the minilm timing input


def build_recipe(model_name: str, variant: str, model: torch.nn.Module) -> Optional[dict]:
    from obcompress.model.layers import find_layers
    from obcompress.solvers import parse_mask_structure

    base = VARIANTS[variant][1]
    if base is None:
        return None
    recipe = copy.deepcopy(base)
    if model_name == "minilm":
        recipe["ignore"] = ["re:pooler\\..*"]  # mean-pooled embeddings never use BERT's pooler
    structure = (recipe.get("sparsity") or {}).get("mask_structure")
    if structure:
        layers = {}
        for name, info in find_layers(model, None, recipe.get("ignore", ())).items():
            try:
                parse_mask_structure(structure, info.cols)
            except ValueError:
                layers[name] = {"solver": "gptq", "sparsity": None}
        if variant in ONLY_STRUCTURED:
            recipe["ignore"] = list(recipe.get("ignore", ())) + sorted(layers)
        elif layers:
            recipe["layers"] = layers
    return recipe


# ---------------------------------------------------------------------------------------------- data


@functools.lru_cache(maxsize=None)
def _digits():
    from obcompress.zoo import digits as D

    return D.load_digits_data()


@functools.lru_cache(maxsize=None)
def _photos():
    from obcompress.zoo import efficientnet as E

    return E.load_tuxpaint(0)


@functools.lru_cache(maxsize=None)
def _minilm_texts():
    from obcompress.zoo import minilm as M

    _, tokenizer = M.load_model()
    return tokenizer, M.load_reviews().train_texts


def timing_inputs(model_name: str, batch: int) -> Dict[str, np.ndarray]:
    """The feed of one timing run: real data of the zoo, ``batch`` samples."""
    if model_name == "digits-cnn":
        return {"x": _digits().X_test[:batch].numpy()}
    if model_name == "efficientnet-lite0":
        images = _photos().images
        reps = -(-batch // images.shape[0])
        return {"x": images.repeat(reps, 1, 1, 1)[:batch].numpy()}
    tokenizer, texts = _minilm_texts()
    enc = tokenizer(list(texts[:batch]), padding="max_length", truncation=True, max_length=MINILM_TOKENS, return_tensors="np")
    return {k: v.astype(np.int64) for k, v in enc.items()}


def as_example(feeds: Dict[str, np.ndarray]):
    tensors = {k: torch.from_numpy(v) for k, v in feeds.items()}
    return tensors["x"] if list(tensors) == ["x"] else tensors


def run_torch(model, feeds) -> np.ndarray:
    example = as_example(feeds)
    with torch.no_grad():
        out = model(**example) if isinstance(example, dict) else model(example)
    if not isinstance(out, torch.Tensor):
        out = out[0]
    return out.numpy()


def session_feeds(sess, feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    names = [i.name for i in sess.get_inputs()]
    if len(names) == 1 and len(feeds) == 1:
        return {names[0]: next(iter(feeds.values()))}
    missing = [n for n in names if n not in feeds]
    if missing:
        raise ValueError(f"the ONNX model wants inputs {missing} that the timing data lack")
    return {n: feeds[n] for n in names}


# model name -> top-1 classes of the dense fp32 model in onnxruntime, for "agree"
_DENSE_TOP1: Dict[str, np.ndarray] = {}


def ort_metrics(model_name: str, sess, dense: bool = False) -> Dict[str, float]:
    """Accuracy in onnxruntime on the zoo's evaluation data (digits, efficientnet); {} for minilm."""
    name = sess.get_inputs()[0].name
    if model_name == "digits-cnn":
        data = _digits()
        logits = np.concatenate([sess.run(None, {name: x.numpy()})[0] for x in data.X_test.split(100)])
        return {"accuracy": float((logits.argmax(1) == data.y_test.numpy()).mean())}
    if model_name == "efficientnet-lite0":
        data = _photos()
        logits = np.concatenate([sess.run(None, {name: x.numpy()})[0] for x in data.images.split(32)])
        top5 = np.argsort(-logits, axis=1)[:, :5]
        hit1 = sum(int(p[0] in ok) for p, ok in zip(top5, data.labels))
        hit5 = sum(bool(set(p.tolist()) & set(ok)) for p, ok in zip(top5, data.labels))
        out = {"top1": hit1 / len(data.labels), "top5": hit5 / len(data.labels)}
        if dense:
            _DENSE_TOP1[model_name] = top5[:, 0]
        if model_name in _DENSE_TOP1:
            out["agree"] = float((top5[:, 0] == _DENSE_TOP1[model_name]).mean())
        return out
    return {}


def sim_metrics(model_name: str, model) -> Dict[str, float]:
    """Top-1 of the PyTorch model (the compression's simulation) on the photos: efficientnet only."""
    if model_name != "efficientnet-lite0":
        return {}
    from obcompress.zoo import efficientnet as E

    data = _photos()
    ok = E.logits(model, data.images).argmax(dim=1).tolist()
    return {"sim top1": sum(int(p in labels) for p, labels in zip(ok, data.labels)) / len(data.labels)}


def latency(sess, feeds, warmup: int, repeats: int) -> float:
    """Median seconds of one run of a single session (``interleaved`` compares several)."""
    return interleaved({"x": (sess, feeds)}, warmup, repeats)["x"]


def interleaved(runs: Dict[str, Any], warmup: int, repeats: int) -> Dict[str, float]:
    """Median seconds per run of each (session, feeds) in ``runs``, timed in turn in the same loop.

    On a machine shared with other jobs the load drifts over minutes; one run of each in every
    round, the order reversed every other round, puts the same drift on all of them."""
    for sess, feeds in runs.values():
        for _ in range(warmup):
            sess.run(None, feeds)
    names = list(runs)
    times: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names if r % 2 == 0 else names[::-1]:
            sess, feeds = runs[n]
            t0 = time.perf_counter()
            sess.run(None, feeds)
            times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(t) for n, t in times.items()}


# ---------------------------------------------------------------------------------------------- runs


def run_one(model_name: str, variant: str, args, workdir: Path) -> Dict[str, Any]:
    from obcompress.api import compress
    from obcompress.formats import artifact_size, fp32_size, save
    from obcompress.formats.onnx_export import export_dense_onnx, export_onnx
    from obcompress.formats.onnx_runtime import ort_optimized_ops, ort_session
    from obcompress.zoo.registry import ZOO

    t_start = time.perf_counter()
    options = {} if model_name == "digits-cnn" else {"num_calibration": args.calibration_samples}
    entry = ZOO[model_name](**options)
    model = entry.model.eval()
    row: Dict[str, Any] = {"model": model_name, "variant": VARIANTS[variant][0], "fp32 bytes": fp32_size(model)}
    recipe = build_recipe(model_name, variant, model)
    example = as_example(timing_inputs(model_name, 2))  # batch 2: the exported batch stays free
    onnx_path = workdir / f"{model_name}-{variant}.onnx"
    if recipe is None:
        out = export_dense_onnx(model, example, onnx_path)
        row["artifact bytes"] = None
    else:
        t0 = time.perf_counter()
        result = compress(model, recipe, entry.calibration, num_calibration_samples=args.calibration_samples,
                          progress=False)
        row["compress s"] = time.perf_counter() - t0
        art = workdir / f"{model_name}-{variant}.artifact"
        save(model, result, art)
        row["artifact bytes"] = artifact_size(art)
        out = export_onnx(model, example, onnx_path, result=result)
    row["onnx bytes"] = out.bytes
    row["onnx / fp32"] = out.bytes / row["fp32 bytes"]

    if recipe is not None:
        convs = [n for n, e in out.layers.items() if e["weight"] != "float" and _is_conv(model, n)]
        row["int convs"] = f"{len(out.integer_ready)}/{len(convs)}"
        ops = ort_optimized_ops(out.path, threads=args.threads[0], exact=args.exact)
        row["QLinearConv"] = ops.get("QLinearConv", 0)
    row.update(sim_metrics(model_name, model) if recipe is not None else {})
    one = timing_inputs(model_name, 1)
    reference = run_torch(model, one)
    sess = ort_session(out.path, threads=args.threads[0], exact=args.exact)
    got = sess.run(None, session_feeds(sess, one))[0]
    row["max abs diff"] = float(np.abs(got - reference).max() / max(np.abs(reference).max(), 1e-12))
    row.update({f"ort {k}": v for k, v in ort_metrics(model_name, sess, dense=recipe is None).items()})
    row["_onnx"] = out.path
    # The same weight-only file, its weights dequantized once at load: the speed of size alone.
    row["_folded"] = recipe is not None and variant != "w8a8"
    row["wall s"] = time.perf_counter() - t_start
    return row


def _is_conv(model, name: str) -> bool:
    return isinstance(dict(model.named_modules()).get(name), (torch.nn.Conv1d, torch.nn.Conv2d))


def time_model(model_name: str, rows: List[Dict[str, Any]], args) -> None:
    """Fill in the latency columns of one model's rows, all its variants timed in the same loop."""
    from obcompress.formats.onnx_runtime import ort_session

    for threads in args.threads:
        sessions = {i: ort_session(r["_onnx"], threads=threads, exact=args.exact) for i, r in enumerate(rows)}
        for batch in args.batches:
            runs = {k: (sess, session_feeds(sess, timing_inputs(model_name, batch))) for k, sess in sessions.items()}
            if threads == args.threads[0] and batch == args.batches[-1]:
                for i, r in enumerate(rows):
                    if r["_folded"]:
                        sess = ort_session(r["_onnx"], threads=threads, exact=args.exact, fold_weights=True)
                        runs[f"{i} folded"] = (sess, session_feeds(sess, timing_inputs(model_name, batch)))
            medians = interleaved(runs, args.warmup, args.repeats)
            for k, seconds in medians.items():
                i, _, folded = str(k).partition(" ")
                col = FOLDED.format(t=threads, b=batch) if folded else f"ms t{threads} b{batch}"
                rows[int(i)][col] = 1e3 * seconds


def columns(args) -> List[str]:
    cols = ["model", "variant", "fp32 bytes", "artifact bytes", "onnx bytes", "onnx / fp32"]
    cols += [f"ms t{t} b{b}" for t in args.threads for b in args.batches]
    cols.append(FOLDED.format(t=args.threads[0], b=args.batches[-1]))
    return cols + ["int convs", "QLinearConv", "ort accuracy", "ort top1", "ort top5", "ort agree", "sim top1",
                   "max abs diff", "compress s", "wall s"]


def fmt(col: str, v: Any) -> str:
    if v is None:
        return "-"
    if col.endswith("bytes"):
        return f"{v:,d}"
    if col.startswith("ms "):
        return f"{v:.2f}" if v < 100 else f"{v:.0f}"
    if col.startswith("ort ") or col == "sim top1":
        return f"{100 * v:.1f}"
    if col == "onnx / fp32":
        return f"{v:.3f}"
    if col == "max abs diff":
        return f"{v:.1e}"
    if col.endswith(" s"):
        return f"{v:.1f}"
    return str(v)


def table(rows: List[Dict[str, Any]], cols: List[str]) -> str:
    cols = [c for c in cols if any(c in r for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(c, r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--threads", default="1,2", help="onnxruntime intra-op thread counts (default 1,2)")
    ap.add_argument("--batches", default="1,32", help="batch sizes timed (default 1,32)")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds per setting (one run of each variant in "
                    "turn); the median is reported")
    ap.add_argument("--time", default=None, metavar="VARIANTS", help="comma list of the variants to time "
                    "(default: all that run; the others get sizes and accuracy only)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed runs first")
    ap.add_argument("--calibration-samples", type=int, default=128, metavar="N")
    ap.add_argument("--torch-threads", type=int, default=2, help="torch threads for compressing")
    ap.add_argument("--exact", action="store_true", help="sessions that match PyTorch (see ort_session)")
    ap.add_argument("--keep", default=None, metavar="DIR", help="keep the .onnx files and artifacts here")
    ap.add_argument("--markdown", default=None, metavar="FILE", help="append the table to this file")
    args = ap.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    timed = variants if args.time is None else [v.strip() for v in args.time.split(",") if v.strip()]
    bad = [m for m in models if m not in MODELS] + [v for v in variants + timed if v not in VARIANTS]
    if bad:
        ap.error(f"unknown models/variants {bad}")
    try:
        args.threads = [int(t) for t in args.threads.split(",")]
        args.batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        ap.error("--threads and --batches are comma lists of integers")
    if min(args.threads + args.batches) < 1 or args.repeats < 1 or args.warmup < 0:
        ap.error("threads, batches and repeats must be >= 1, warmup >= 0")
    torch.set_num_threads(args.torch_threads)

    import onnxruntime as ort

    rows = []
    with tempfile.TemporaryDirectory(prefix="obcompress-runtime-") as tmp:
        workdir = Path(args.keep) if args.keep else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for model_name in models:
            mine = []
            for variant in variants:
                try:
                    row = run_one(model_name, variant, args, workdir)
                    if variant in timed:
                        mine.append(row)
                except Exception as e:  # one failing setting should not lose the others' rows
                    print(f"{model_name} {variant}: FAILED: {type(e).__name__}: {e}", file=sys.stderr)
                    row = {"model": model_name, "variant": VARIANTS[variant][0] + " (failed)"}
                rows.append(row)
                print(table(rows[-1:], columns(args)).splitlines()[-1], file=sys.stderr, flush=True)
            if mine:
                time_model(model_name, mine, args)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    head = (f"### onnxruntime {ort.__version__}, torch {torch.__version__}, {cpu}; "
            f"{datetime.date.today().isoformat()}; {'exact' if args.exact else 'default'} sessions, "
            f"{args.warmup} warm-up runs, then the median of {args.repeats} interleaved rounds; "
            f"load average at the end {', '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores\n\n")
    text = head + table(rows, columns(args)) + "\n"
    print(text)
    if args.markdown:
        with open(args.markdown, "a", encoding="utf-8") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
