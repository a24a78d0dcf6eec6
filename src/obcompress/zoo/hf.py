"""Hugging Face models by path, text files as calibration data, and perplexity as their evaluation.

``resolve("hf:DIR", data="text:calib.txt", eval_data="perplexity:eval.txt", seq_len=512,
num_calibration=16)`` gives a ``ZooEntry`` like any zoo model:

- the model: ``DIR`` is a local model directory (config.json + weights), loaded in float32 with the
  ``AutoModelFor...`` class that its config's ``architectures`` names (``hf_class`` overrides it,
  e.g. ``AutoModelForCausalLM`` or ``LlamaForCausalLM``). Nothing is ever downloaded: a name that is
  not a local directory is refused with what to do.
- calibration: ``num_calibration`` windows of ``seq_len`` tokens from the text file, their starts
  spread evenly over the whole file (deterministic; windows overlap only when more are asked than
  the file holds), each one batch ``{"input_ids": (1, seq_len)}``.
- evaluate: perplexity on the evaluation file: it is cut into consecutive non-overlapping windows of
  ``seq_len`` tokens (the last partial one dropped; at most ``eval_windows`` of them, from the
  start), each window is one forward pass, and the perplexity is exp of the mean negative
  log-likelihood of every token after the first of its window given the ones before it. The number
  of windows is reported beside it. A calibration file that is also the evaluation file is warned
  about: a model calibrated on the text it is scored on looks better than it is.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ._fetch import require

__all__ = [
    "HF_PREFIX",
    "NextTokenLogits",
    "TextWindows",
    "calibration_windows",
    "evaluation_windows",
    "hf_entry",
    "load_hf_model",
    "perplexity",
    "tokenize_file",
]

HF_PREFIX = "hf:"
TEXT_PREFIX = "text:"
PERPLEXITY_PREFIX = "perplexity:"
DEFAULT_SEQ_LEN = 512
_WHAT = "a Hugging Face model (hf:DIR)"

# Auto classes tried, in order, for the architecture a config names.
_AUTO_CLASSES = (
    ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    ("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
    ("AutoModelForSeq2SeqLM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
    ("AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForTokenClassification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForQuestionAnswering", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES"),
    ("AutoModelForImageClassification", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModel", "MODEL_MAPPING_NAMES"),
)


def _model_dir(spec: str) -> Path:
    raw = spec[len(HF_PREFIX):] if spec.startswith(HF_PREFIX) else spec
    if not raw:
        raise ValueError("hf: needs a local model directory, e.g. hf:./SmolLM2-135M")
    d = Path(raw).expanduser()
    if not d.is_dir():
        hub_like = raw.count("/") == 1 and not raw.startswith((".", "/", "~"))
        hint = (f"; obcompress never downloads from the Hugging Face hub: fetch it first (e.g. `hf download {raw} "
                f"--local-dir DIR`) and pass hf:DIR") if hub_like else ""
        raise ValueError(f"hf:{raw}: no such local directory{hint}")
    if not (d / "config.json").is_file():
        raise ValueError(f"hf:{raw}: {d} has no config.json, so it is not a Hugging Face model directory")
    return d


def _architecture_class(transformers, directory: Path, hf_class: Optional[str]):
    """The class to load with: ``hf_class`` by name, else the Auto class whose mapping holds the
    config's first architecture, else ``AutoModel``. Returns (class, how it was chosen)."""
    if hf_class:
        cls = getattr(transformers, hf_class, None)
        if cls is None or not hasattr(cls, "from_pretrained"):
            raise ValueError(f"--hf-class {hf_class!r} is not a transformers model class (e.g. AutoModelForCausalLM, "
                             "AutoModel, LlamaForCausalLM)")
        return cls, f"--hf-class {hf_class}"
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{directory / 'config.json'} cannot be read: {e}") from None
    archs = config.get("architectures") or []
    if archs:
        from transformers.models.auto import modeling_auto

        for auto_name, mapping_name in _AUTO_CLASSES:
            names = getattr(modeling_auto, mapping_name, {}) or {}
            for v in names.values():
                if archs[0] in (v if isinstance(v, (tuple, list)) else (v,)):
                    return getattr(transformers, auto_name), f"{auto_name} (config architecture {archs[0]})"
    return transformers.AutoModel, "AutoModel (the config names no known architecture)"


def load_hf_model(directory, hf_class: Optional[str] = None, dtype: torch.dtype = torch.float32
                  ) -> Tuple[nn.Module, Any]:
    """``(model, tokenizer)`` from a local model directory (``hf:`` prefix optional): the model in
    eval mode and ``dtype``, the tokenizer or None when the directory has none."""
    d = _model_dir(str(directory))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the files are local; the hub is never asked
    transformers = require("transformers", "transformers", _WHAT)
    cls, _ = _architecture_class(transformers, d, hf_class)
    major = int(transformers.__version__.split(".")[0])
    kwargs = {"dtype": dtype} if major >= 5 else {"torch_dtype": dtype}
    bars = transformers.utils.logging
    shown = bars.is_progress_bar_enabled()
    if shown:  # a per-tensor loading bar is noise here
        bars.disable_progress_bar()
    try:
        model = cls.from_pretrained(str(d), local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"hf:{d}: transformers cannot load it with {cls.__name__}: {e}") from None
    finally:
        if shown:
            bars.enable_progress_bar()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError):
        tokenizer = None
    return model.eval(), tokenizer


def _file_spec(spec: str, prefix: str, option: str) -> Path:
    if not isinstance(spec, str) or not spec.startswith(prefix):
        raise ValueError(f"{option} takes {prefix}FILE, got {spec!r}")
    p = Path(spec[len(prefix):]).expanduser()
    if not p.is_file():
        raise ValueError(f"{option} {spec}: no such file {p}")
    return p


def tokenize_file(tokenizer, path) -> torch.Tensor:
    """All tokens of a UTF-8 text file as one 1-D int64 tensor (no special tokens added)."""
    if tokenizer is None:
        raise ValueError("text data needs the model's tokenizer, and the model directory has none")
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read it as UTF-8 text ({e})") from None
    if not text.strip():
        raise ValueError(f"{path}: the file holds no text")
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "sequence longer than the model's maximum": we cut windows ourselves
    try:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    finally:
        hf_logging.set_verbosity(level)
    return torch.tensor(ids, dtype=torch.long)


def _check_positive(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return value


def calibration_windows(tokens: torch.Tensor, seq_len: int, count: int) -> List[Dict[str, torch.Tensor]]:
    """``count`` batches ``{"input_ids": (1, seq_len)}`` whose starts are spread evenly from the first
    token to the last full window: the same windows every time, covering the whole text."""
    _check_positive(seq_len, "seq_len")
    _check_positive(count, "the number of calibration windows")
    T = int(tokens.numel())
    if T < seq_len:
        raise ValueError(f"the calibration text has {T} tokens, fewer than one window of {seq_len}")
    last = T - seq_len
    starts = [0] if count == 1 else [round(i * last / (count - 1)) for i in range(count)]
    return [{"input_ids": tokens[s:s + seq_len].reshape(1, seq_len).clone()} for s in starts]


def evaluation_windows(tokens: torch.Tensor, seq_len: int, max_windows: Optional[int] = None
                       ) -> List[Dict[str, torch.Tensor]]:
    """Consecutive non-overlapping windows of ``seq_len`` tokens from the start (a last partial
    window is dropped), at most ``max_windows`` of them."""
    _check_positive(seq_len, "seq_len")
    n = int(tokens.numel()) // seq_len
    if n == 0:
        raise ValueError(f"the evaluation text has {tokens.numel()} tokens, fewer than one window of {seq_len}")
    if max_windows is not None:
        n = min(n, _check_positive(max_windows, "the number of evaluation windows"))
    return [{"input_ids": tokens[i * seq_len:(i + 1) * seq_len].reshape(1, seq_len).clone()} for i in range(n)]


@torch.no_grad()
def perplexity(model: nn.Module, windows: Sequence[Dict[str, torch.Tensor]], progress: bool = False
               ) -> Dict[str, float]:
    """exp(mean NLL) over every predicted token of every window (each token after the first of its
    window, given the ones before it); returns perplexity, nll (nats per token) and windows."""
    from .._progress import progress_bar

    if not windows:
        raise ValueError("perplexity needs at least one window")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for w in progress_bar(windows, progress=progress, desc="perplexity", unit="window"):
            ids = w["input_ids"]
            out = model(input_ids=ids)
            logits = out.logits if hasattr(out, "logits") else out[0]
            if logits.dim() != 3 or logits.shape[:2] != ids.shape:
                raise ValueError(f"perplexity needs per-token logits (batch, tokens, vocabulary) from the model, got "
                                 f"shape {tuple(logits.shape)}; is it a causal language model (--hf-class "
                                 "AutoModelForCausalLM)?")
            nll = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum")
            total += float(nll.double())
            count += ids.shape[1] - 1
    finally:
        model.train(was_training)
    mean = total / count
    if not math.isfinite(mean):
        raise ValueError("the model's negative log-likelihood is not finite (NaN or inf logits)")
    return {"perplexity": math.exp(mean), "nll": mean, "windows": len(windows)}


class TextWindows:
    """Calibration windows of a text file, tokenized on first use (commands that never calibrate,
    such as eval, never read the file)."""

    def __init__(self, tokenizer, path: Path, seq_len: int, count: int):
        self.tokenizer, self.path, self.seq_len, self.count = tokenizer, path, seq_len, count
        self._windows: Optional[List[Dict[str, torch.Tensor]]] = None

    def windows(self) -> List[Dict[str, torch.Tensor]]:
        if self._windows is None:
            self._windows = calibration_windows(tokenize_file(self.tokenizer, self.path), self.seq_len, self.count)
        return self._windows

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        return iter(self.windows())

    def __len__(self) -> int:
        return len(self.windows())


class NextTokenLogits(nn.Module):
    """A causal language model as a classifier of the next token at every position: logits
    (batch, vocabulary, positions - 1), the layout ``cross_entropy`` takes with labels (batch,
    positions - 1). It is the loss a Fisher of the model's weights should see (FITCompress)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids):
        out = self.lm(input_ids=input_ids)
        logits = out.logits if hasattr(out, "logits") else out[0]
        if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
            raise ValueError("the Fisher of an hf: model needs per-token logits (a causal language model, "
                             "--hf-class AutoModelForCausalLM)")
        return logits[:, :-1].transpose(1, 2)


def _weight_layer(m: nn.Module) -> bool:
    """The layers a language model's Fisher covers: Linear and transformers' Conv1D (GPT-2 style)."""
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


class _NoData:
    """Stands for the calibration data of an hf: model given no --data: any use says what to pass."""

    def __init__(self, spec: str):
        self.spec = spec

    def __iter__(self):
        raise ValueError(f"{self.spec} needs calibration data: --data text:FILE (in Python: data='text:FILE')")


def hf_entry(spec: str, *, data: Optional[str] = None, eval_data: Optional[str] = None,
             seq_len: int = DEFAULT_SEQ_LEN, num_calibration: int = 16, eval_windows: Optional[int] = None,
             hf_class: Optional[str] = None, progress: bool = False):
    """The ``ZooEntry`` of ``hf:DIR`` with text calibration data and a perplexity evaluation."""
    from .entries import ZooEntry

    _check_positive(seq_len, "--seq-len")
    _check_positive(num_calibration, "--calibration-samples")
    calib_path = _file_spec(data, TEXT_PREFIX, "--data") if data is not None else None
    eval_path = _file_spec(eval_data, PERPLEXITY_PREFIX, "--eval-data") if eval_data is not None else None
    if eval_windows is not None:
        _check_positive(eval_windows, "--eval-windows")
    if calib_path is not None and eval_path is not None and calib_path.resolve() == eval_path.resolve():
        warnings.warn(f"calibration and evaluation read the same file {calib_path}: the perplexity is measured on "
                      "the text the model was calibrated on and will look better than it is", stacklevel=2)
    model, tokenizer = load_hf_model(spec, hf_class)
    if (calib_path is not None or eval_path is not None) and tokenizer is None:
        raise ValueError(f"{spec}: the directory has no tokenizer, which text data needs")
    calibration = TextWindows(tokenizer, calib_path, seq_len, num_calibration) if calib_path else _NoData(spec)
    cache: List[List[Dict[str, torch.Tensor]]] = []

    def evaluate(m: nn.Module) -> Dict[str, float]:
        if eval_path is None:
            return {}
        if not cache:
            cache.append(evaluation_windows(tokenize_file(tokenizer, eval_path), seq_len, eval_windows))
        return perplexity(m, cache[0], progress=progress)

    def fisher_task():
        from .entries import FisherTask

        wrapper = NextTokenLogits(model)
        data = [(w["input_ids"], w["input_ids"][:, 1:]) for w in calibration]
        # The output embedding is left out, as in every LLM recipe: it is often tied to the input one.
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        names = [n for n, m in wrapper.named_modules() if m is not head and _weight_layer(m)]
        return FisherTask(wrapper, data, lambda w: evaluate(w.lm), names, "lm.")

    return ZooEntry(model, calibration, evaluate, fisher_task)


# ---------------------------------------------------------------------------------------------- CLI

# The options the CLI gives every command with --model (cli.add_hf_options defines them).
_CLI_DESTS = ("hf_class", "data", "eval_data", "seq_len", "eval_windows")


def cli_options(args, model: str) -> Dict[str, Any]:
    """``resolve`` keyword arguments from the parsed options; a ValueError if hf: options were given
    for a model that is not ``hf:DIR``."""
    given = {d: getattr(args, d, None) for d in _CLI_DESTS if getattr(args, d, None) is not None}
    if not model.startswith(HF_PREFIX):
        if given:
            flags = ", ".join("--" + d.replace("_", "-") for d in given)
            raise ValueError(f"{flags}: only for Hugging Face models (--model hf:DIR), not {model!r}")
        return {}
    if "seq_len" not in given:
        given["seq_len"] = DEFAULT_SEQ_LEN
    if hasattr(args, "no_progress"):
        given["progress"] = not args.no_progress
    return given
