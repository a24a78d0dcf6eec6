"""Your own model through the command line: a small CNN on scikit-learn's digits, as a user writes it.

    obcompress compress --model examples/my_cnn.py:factory --recipe examples/recipes/gptq-4bit.yaml --out art/
    obcompress eval     --model examples/my_cnn.py:factory --artifact art/
    obcompress search build --model examples/my_cnn.py:factory --db db/

``--model path/to/file.py:factory`` imports this file and calls ``factory()`` with no arguments. It
returns ``(model, calibration batches, evaluate)`` — or a fourth item, a ``FisherTask``, for
``search fit`` on a model without logits of its own; see the README, "Your own model".

The data ship inside scikit-learn, so this runs offline. Training takes a few seconds the first
time; the weights are then cached as safetensors (no pickle) and reused, so every call returns the
same model: ``eval --artifact`` and ``search select --eval`` call the factory again and must get the
model the artifact or the database was made from.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

TRAINING = {"seed": 0, "epochs": 12, "batch_size": 64, "lr": 3e-3}
CALIBRATION_SAMPLES = 256  # what `compress` takes by default (--calibration-samples)


class SmallCNN(nn.Module):
    """The layers are named as torch names them in nn.Sequential: features.0, features.2,
    classifier.1, classifier.3; recipes and --ignore use these names."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),      # features.0: 16 x 9 weights (1 channel x 3x3)
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),     # features.2: 32 x 144
            nn.MaxPool2d(2),                                # 8x8 -> 4x4
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 64), nn.ReLU(),           # classifier.1: 64 x 512
            nn.Linear(64, 10),                              # classifier.3: 10 x 64
        )

    def forward(self, x):
        return self.classifier(self.features(x))


def load_data():
    """Images (N, 1, 8, 8) in [0, 1] and labels, split 1,297 train / 500 test by a fixed permutation."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    X = torch.from_numpy(digits.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = torch.from_numpy(digits.target.astype(np.int64))
    order = torch.from_numpy(np.random.RandomState(1).permutation(len(y)))
    test, train = order[:500], order[500:]
    return X[train], y[train], X[test], y[test]


def train(X, y) -> SmallCNN:
    torch.manual_seed(TRAINING["seed"])
    model = SmallCNN()
    opt = torch.optim.Adam(model.parameters(), lr=TRAINING["lr"])
    gen = torch.Generator().manual_seed(TRAINING["seed"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ops this small only lose to thread overhead (and to a busy machine)
    try:
        model.train()
        for _ in range(TRAINING["epochs"]):
            for idx in torch.randperm(len(y), generator=gen).split(TRAINING["batch_size"]):
                opt.zero_grad()
                F.cross_entropy(model(X[idx]), y[idx]).backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def trained_model(X, y) -> SmallCNN:
    """Trained once, then loaded from the cache (keyed by the training settings)."""
    root = os.environ.get("OBCOMPRESS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "obcompress")
    key = hashlib.sha256(json.dumps(TRAINING, sort_keys=True).encode()).hexdigest()[:12]
    path = Path(root) / "examples" / f"my_cnn-{key}.safetensors"
    model = SmallCNN()
    if path.exists():
        model.load_state_dict(load_file(path))
        return model.eval()
    model = train(X, y)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written beside and moved into place: a second process never reads half a file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    save_file(model.state_dict(), tmp)
    os.replace(tmp, path)
    return model


def factory():
    X_train, y_train, X_test, y_test = load_data()
    model = trained_model(X_train, y_train)            # eval mode; obcompress compresses it in place

    # Calibration: training images, never test images, as (inputs, labels) batches (a tensor of
    # inputs alone, or a dict of keyword arguments, also works); `search fit` uses the labels.
    n = CALIBRATION_SAMPLES
    calibration = list(zip(X_train[:n].split(64), y_train[:n].split(64)))

    # Whatever compares with the dense model is computed now, before anything is compressed:
    # evaluate() is called on this very model object after it has been compressed in place.
    with torch.no_grad():
        dense_predictions = model(X_test).argmax(dim=1)

    def evaluate(m: nn.Module) -> dict:
        """Metrics by name; the first of top1 / accuracy (else the first key) is what sweeps plot."""
        m.eval()
        with torch.no_grad():
            predictions = m(X_test).argmax(dim=1)
        return {"accuracy": float((predictions == y_test).float().mean()),
                "agreement": float((predictions == dense_predictions).float().mean())}

    return model, calibration, evaluate
