"""Which compressed-tensors versions load obcompress's exports, through transformers, exactly.

A tiny random Llama (LlamaConfig, no download) is compressed with each recipe below, saved as an
artifact, exported with ``ct_version`` set to each version under test, and loaded by
``AutoModelForCausalLM.from_pretrained`` in a fresh Python process that imports that version of
compressed-tensors (installed beforehand into its own folder with ``pip install --no-deps --target``,
put first on PYTHONPATH). Printed: the largest logit difference to obcompress's compressed model,
relative to the largest logit, or the loader's error.

Usage:
    for v in 0.15.0.1 0.16.0 0.17.1 0.18.0 0.19.0 0.20.1; do
        pip install --no-deps --target /tmp/ct/$v compressed-tensors==$v; done
    python benchmarks/ct_versions.py --versions 0.15.0.1,0.16.0,0.17.1,0.18.0,0.19.0,0.20.1 --root /tmp/ct
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

RECIPES = {
    "gptq_w4g128": {"solver": "gptq", "ignore": ["lm_head"],
                    "quantization": {"num_bits": 4, "strategy": "group", "group_size": 128}},
    "gptq_w4g32_act_order": {"solver": "gptq", "ignore": ["lm_head"],
                             "quantization": {"num_bits": 4, "strategy": "group", "group_size": 32, "act_order": True}},
    "gptq_w3g96_asym": {"solver": "gptq", "ignore": ["lm_head"],
                        "quantization": {"num_bits": 3, "symmetric": False, "strategy": "group", "group_size": 96}},
    "sparsegpt_24_w4": {"solver": "sparsegpt", "ignore": ["lm_head"], "sparsity": {"mask_structure": "2:4"},
                        "quantization": {"num_bits": 4}},
    "exactobs_50": {"solver": "exact", "ignore": ["lm_head"], "sparsity": {"sparsity": 0.5}},
    "rtn_w4a8": {"solver": "rtn", "ignore": ["lm_head"], "quantization": {"num_bits": 4, "activations": {"num_bits": 8}}},
}

_RELOAD = """
import json, sys, torch, compressed_tensors
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from transformers.utils import logging
logging.set_verbosity_error(); logging.disable_progress_bar()
ids = load_file(sys.argv[1])["ids"]
out = {"version": compressed_tensors.__version__}
for d in sys.argv[2:]:
    try:
        m = AutoModelForCausalLM.from_pretrained(d)
        with torch.no_grad():
            out[d] = m(input_ids=ids).logits.tolist()
    except Exception as e:
        out[d] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
print(json.dumps(out))
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--versions", required=True, help="comma-separated compressed-tensors versions")
    ap.add_argument("--root", required=True, help="folder holding one --target install per version, named by it")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--asymmetric", default="auto", choices=("auto", "zero-point", "widen"),
                    help="how asymmetric grids are written (export_compressed_tensors' asymmetric=)")
    args = ap.parse_args(argv)

    from transformers import LlamaConfig, LlamaForCausalLM
    from safetensors.torch import save_file

    from obcompress.api import compress
    from obcompress.formats import save
    from obcompress.formats.compressed_tensors import export_compressed_tensors

    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)

    def fresh():
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval()

    g = torch.Generator().manual_seed(1)
    calib = [{"input_ids": torch.randint(0, 256, (1, 64), generator=g)} for _ in range(16)]
    ids = torch.randint(0, 256, (2, 48), generator=g)
    work = Path(tempfile.mkdtemp(prefix="ct_versions-"))
    save_file({"ids": ids}, str(work / "ids.safetensors"))
    refs = {}
    for key in args.recipes.split(","):
        m = fresh()
        result = compress(m, RECIPES[key], calib, num_calibration_samples=16, progress=False)
        save(m, result, work / f"art_{key}")
        with torch.no_grad():
            refs[key] = m(input_ids=ids).logits
    print("| recipe | " + " | ".join(args.versions.split(",")) + " |")
    print("|---|" + "---|" * len(args.versions.split(",")))
    table = {key: [] for key in refs}
    for v in args.versions.split(","):
        dirs = {}
        for key in refs:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = export_compressed_tensors(fresh(), work / f"art_{key}", work / f"ct_{key}_{v}", ct_version=v,
                                                asymmetric=args.asymmetric)
            written = {e["written"] for e in out.layers.values()}
            bits = {e["bits"] for e in out.layers.values() if e["bits"]}
            dirs[key] = (str(out.directory), "+".join(sorted(written)) + (f" {sorted(bits)}-bit" if bits else ""))
        env = {**os.environ, "PYTHONPATH": str(Path(args.root) / v), "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run([sys.executable, "-c", _RELOAD, str(work / "ids.safetensors"),
                               *[d for d, _ in dirs.values()]], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-2000:])
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        if got["version"] != v:
            raise SystemExit(f"{Path(args.root) / v} holds compressed-tensors {got['version']}, not {v}")
        for key, (d, how) in dirs.items():
            r = got[d]
            if isinstance(r, str):
                table[key].append(f"fails: {r}")
            else:
                rel = float((torch.tensor(r) - refs[key]).abs().max() / refs[key].abs().max())
                table[key].append(f"{rel:.1e} ({how})")
    for key, cells in table.items():
        print(f"| {key} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
