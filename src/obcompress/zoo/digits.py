"""A small CNN on scikit-learn's bundled digits (8x8 grey images, 10 classes), trained on the fly.

The data ship inside scikit-learn, so this model installs and runs offline. Its layers are the
architecture of the benchmark layers in ``shared/bench/layers/digits_*``:

    conv1  Conv2d(1, 32, 3, padding=1)    W 32 x 9      8x8 -> 8x8
    conv2  Conv2d(32, 64, 3)              W 64 x 288    8x8 -> 6x6, then max-pool 2 -> 3x3
    fc1    Linear(576, 128)               W 128 x 576
    fc2    Linear(128, 10)                W 10 x 128

Training takes a few seconds on a CPU; the weights are cached as safetensors (never pickle) under
``$OBCOMPRESS_CACHE``, else ``$XDG_CACHE_HOME/obcompress``, else ``~/.cache/obcompress``.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import NamedTuple, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..files import atomic_path, cache_dir

# The split and the training recipe are part of the cache key: change them and the cached
# weights are retrained instead of silently reused.
SPLIT_SEED = 0
NUM_TEST = 500
TRAIN_CONFIG = {"seed": 0, "epochs": 15, "batch_size": 64, "lr": 2e-3, "weight_decay": 1e-4}
ARCH_VERSION = 1


class DigitsData(NamedTuple):
    """Images are float32 (N, 1, 8, 8) in [0, 1]; labels int64 (N,)."""

    X_train: torch.Tensor
    y_train: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.fc1 = nn.Linear(64 * 3 * 3, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


def split_indices(total: int = 1797):
    """(train, test) index tensors into scikit-learn's digits: a fixed permutation, test first."""
    # numpy's legacy RandomState stream is frozen across numpy versions, so the split is too.
    perm = torch.from_numpy(np.random.RandomState(SPLIT_SEED).permutation(total))
    return perm[NUM_TEST:], perm[:NUM_TEST]


def load_digits_data() -> DigitsData:
    """The 1,797 digits split into 1,297 training and 500 test images by a fixed permutation."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the digits data come from scikit-learn: pip install 'obcompress[demo]' (or scikit-learn)"
        ) from e
    digits = load_digits()
    X = torch.from_numpy(digits.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = torch.from_numpy(digits.target.astype(np.int64))
    train, test = split_indices(len(y))
    return DigitsData(X[train].contiguous(), y[train].contiguous(), X[test].contiguous(), y[test].contiguous())


def calibration_inputs(n: int = 1024, data: Optional[DigitsData] = None) -> torch.Tensor:
    """The first ``n`` training images (never test images), shape (n, 1, 8, 8)."""
    data = data if data is not None else load_digits_data()
    total = data.X_train.shape[0]
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= total:
        raise ValueError(f"calibration_inputs: n must be an integer in 1..{total} (the training split), got {n!r}")
    return data.X_train[:n].clone()


@torch.no_grad()
def evaluate(model: nn.Module, X: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy of ``model`` on (X, y), in [0, 1]."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, X.shape[0], batch_size):
        correct += int((model(X[i : i + batch_size]).argmax(dim=1) == y[i : i + batch_size]).sum())
    model.train(was_training)
    return correct / X.shape[0]


def _cache_key() -> str:
    blob = json.dumps(
        {"arch": ARCH_VERSION, "split_seed": SPLIT_SEED, "num_test": NUM_TEST, **TRAIN_CONFIG}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def weights_path() -> Path:
    return cache_dir() / f"digits_cnn-{_cache_key()}.safetensors"


def _fresh_model(seed: int) -> DigitsCNN:
    # fork_rng keeps the caller's global RNG untouched while the init is seeded.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DigitsCNN()


def train_digits_cnn(data: Optional[DigitsData] = None, **overrides) -> DigitsCNN:
    """Train a fresh DigitsCNN with Adam (deterministic for a given seed)."""
    cfg = {**TRAIN_CONFIG, **overrides}
    data = data if data is not None else load_digits_data()
    model = _fresh_model(cfg["seed"])
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg["epochs"])
    gen = torch.Generator().manual_seed(cfg["seed"])
    n = data.X_train.shape[0]
    # One thread: these ops are too small to gain from more, a second thread only loses when the
    # cores are busy (5x slower measured on 2 loaded cores), and the result no longer depends on
    # the machine's core count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model.train()
        for _ in range(cfg["epochs"]):
            for idx in torch.randperm(n, generator=gen).split(cfg["batch_size"]):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(data.X_train[idx]), data.y_train[idx]).backward()
                opt.step()
            sched.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return model


def save_weights(model: nn.Module, path: Union[str, Path], metadata: Optional[dict] = None) -> None:
    """Write the state dict as safetensors, atomically (a reader never sees a half-written file)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)


def load_weights(model: nn.Module, path: Union[str, Path]) -> nn.Module:
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(path)), strict=True)
    return model


def digits_cnn(pretrained: bool = True, data: Optional[DigitsData] = None) -> DigitsCNN:
    """The digits CNN in eval mode; ``pretrained`` loads the cached weights, training them on first use."""
    if not pretrained:
        return _fresh_model(TRAIN_CONFIG["seed"]).eval()
    path = weights_path()
    if path.exists():
        try:
            return load_weights(DigitsCNN(), path).eval()
        except Exception as e:  # a truncated or foreign file: retrain rather than fail
            warnings.warn(f"ignoring unreadable cached weights {path} ({e}); retraining", stacklevel=2)
    data = data if data is not None else load_digits_data()
    model = train_digits_cnn(data)
    meta = {"test_accuracy": f"{evaluate(model, data.X_test, data.y_test):.4f}", "config": json.dumps(TRAIN_CONFIG)}
    try:
        save_weights(model, path, meta)
    except OSError as e:  # a read-only home still gets a working model
        warnings.warn(f"could not cache the digits CNN weights at {path}: {e}", stacklevel=2)
    return model
