"""What a zoo entry is: ``ZooEntry`` (model, calibration data, evaluate, fisher task) and the
``FisherTask`` of a model without classification logits. Their own module, so that the registry and
the entry builders it dispatches to (``hf``) both import them without importing each other."""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Tuple

import torch
from torch import nn

__all__ = ["FisherTask", "ZooEntry"]


class FisherTask(NamedTuple):
    """What a Fisher (FITCompress) needs where the model itself has no classification loss: a module
    around the entry's model that outputs logits, labelled ``(inputs, labels)`` batches for it, the
    evaluation of such a module, and the layers of it to consider (``find_layers`` targets)."""

    model: nn.Module
    data: List[Tuple[Any, torch.Tensor]]
    evaluate: Callable[[nn.Module], Dict[str, float]]
    targets: Optional[List[str]] = None
    # Where the entry's model sits in ``model``: its layer names there start with this.
    prefix: str = ""


class ZooEntry(NamedTuple):
    model: nn.Module
    calibration: Iterable
    evaluate: Callable[[nn.Module], Dict[str, float]]
    # Built on demand (it may load data); None: the model's own logits and the calibration data serve.
    fisher_task: Optional[Callable[[], FisherTask]] = None
