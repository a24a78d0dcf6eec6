"""A configuration's cost over the whole model, beside the searched layers' cost that a goal counts.

A goal such as ``size=1/16`` is a fraction of the *searched* layers' dense cost: layers left out of
the search (``--ignore``), biases, norms, embeddings and every other tensor stay as they are. On
a model whose largest layer is ignored, 16x on the searched layers may be 1.1x on the whole model.
``WholeModel`` measures what the rest costs (once per model and cost) and turns a searched-layer
cost into the whole-model figure:

- ``size``: every tensor of the model's state as an fp32 checkpoint counts it (``fp32_size``), with
  the searched layers' weights replaced by the bits the artifact stores for their variants. The
  artifact's JSON files and its safetensors header are not counted (a few KiB).
- ``bops``, ``flops``, ``latency``: every compressible layer of the model (nn.Linear, Conv1d,
  Conv2d), the layers outside the search at their dense cost (their output positions measured by
  one pass over the calibration batches); other operations (attention products, norms,
  activations) count in neither figure.

Since the rest is a constant F, the whole-model reduction is (F + D) / (F + D / r) for a
searched-layer reduction r over a dense searched cost D: ``whole_reduction(r)``, monotone in r.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch
import torch.nn as nn

from ..model.calibration import count_samples, run_model
from ..model.layers import LayerInfo, find_layers
from .costs import CostModel
from .space import LayerGeometry

__all__ = ["ModelCost", "WholeModel", "layer_positions"]


@dataclass(frozen=True)
class ModelCost:
    """One configuration's cost: over the searched layers (what the goal counts) and the whole model."""

    cost_name: str
    searched_cost: float
    searched_dense: float
    cost: float
    dense_cost: float
    searched_layers: int
    layers: int

    @property
    def searched_reduction(self) -> float:
        return self.searched_dense / self.searched_cost if self.searched_cost > 0 else float("inf")

    @property
    def reduction(self) -> float:
        """The whole model's reduction."""
        return self.dense_cost / self.cost if self.cost > 0 else float("inf")

    def summary(self) -> str:
        return (f"{self.cost_name} {self.searched_reduction:.2f}x on the {self.searched_layers} searched layers, "
                f"{self.reduction:.2f}x on the whole model")

    def to_dict(self) -> Dict[str, Any]:
        return {"cost": self.cost_name, "searched_cost": self.searched_cost, "searched_dense_cost": self.searched_dense,
                "searched_reduction": self.searched_reduction, "whole_cost": self.cost,
                "whole_dense_cost": self.dense_cost, "whole_reduction": self.reduction,
                "searched_layers": self.searched_layers, "layers": self.layers}


def layer_positions(model: nn.Module, layers: Dict[str, LayerInfo], batches: Sequence[Any]) -> Dict[str, float]:
    """Output positions per sample of each layer (1 for a Linear on vectors, tokens, conv pixels),
    summed over its calls, as the database's Hessian sample counts give them: one pass over
    ``batches`` (model inputs, see ``calibration_batches``). 0 for a layer the model never calls."""
    calls = {n: 0 for n in layers}

    def hook_for(name: str, info: LayerInfo):
        def hook(module, args, output):
            if isinstance(output, torch.Tensor):
                calls[name] += output.numel() // (info.groups * info.rows)
        return hook

    handles = [info.module.register_forward_hook(hook_for(n, info)) for n, info in layers.items()]
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    samples = 0
    try:
        with torch.no_grad():
            for b in batches:
                samples += count_samples(b)
                run_model(model, b)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training
    return {n: c / max(samples, 1) for n, c in calls.items()}


def _geometry(info: LayerInfo, positions: float) -> LayerGeometry:
    return LayerGeometry(name=info.name, kind=info.kind, groups=info.groups, rows=info.rows, cols=info.cols,
                         taps=info.taps, positions=positions,
                         has_bias=getattr(info.module, "bias", None) is not None)


class WholeModel:
    """What ``cost`` counts of ``model`` beyond the layers ``searched``; ``of(searched_cost,
    searched_dense)`` gives a configuration's ``ModelCost``.

    ``batches`` (model inputs, or a function returning them, called only if needed) are needed
    only where a cost depends on output positions and some compressible layer lies outside the
    search; the model is run once then, not changed.
    """

    def __init__(self, cost: CostModel, model: nn.Module, searched: Iterable[str],
                 batches: Union[None, Sequence[Any], Callable[[], Sequence[Any]]] = None):
        if not isinstance(cost, CostModel):
            raise ValueError(f"cost must be a cost model (see make_cost), got {type(cost).__name__}")
        found = find_layers(model, None, ())
        searched = list(searched)
        unknown = [n for n in searched if n not in found]
        if unknown:
            raise ValueError(f"searched layers {unknown[:5]} are not compressible layers of {type(model).__name__}")
        inside = set(searched)
        self.cost_name = cost.name
        self.searched: List[str] = searched
        self.outside: List[str] = [n for n in found if n not in inside]
        self.layers = len(found)
        if cost.name == "size":
            from ..formats.artifact import fp32_size

            # Everything but the searched weights, at what an fp32 checkpoint stores; the searched
            # weights' dense size (4 bytes each) is exactly what SizeCost counts for them dense.
            searched_dense = sum(cost.dense(_geometry(found[n], 1.0)) for n in searched)
            self.rest = 8.0 * fp32_size(model) - searched_dense
        elif not self.outside:
            self.rest = 0.0
        else:
            if batches is None:
                raise ValueError(f"the whole model's {cost.name} needs calibration batches to measure the output "
                                 f"positions of the layers outside the search ({', '.join(self.outside[:3])} ...)")
            rest = {n: found[n] for n in self.outside}
            positions = layer_positions(model, rest, list(batches() if callable(batches) else batches))
            # A layer the model never calls costs nothing to run.
            self.rest = float(sum(cost.dense(_geometry(info, positions[n])) for n, info in rest.items()
                                  if positions[n] > 0))

    def of(self, searched_cost: float, searched_dense: float) -> ModelCost:
        return ModelCost(self.cost_name, float(searched_cost), float(searched_dense), self.rest + searched_cost,
                         self.rest + searched_dense, len(self.searched), self.layers)

    def whole_reduction(self, searched_reduction: float, searched_dense: float) -> float:
        """The whole model's reduction at a searched-layer reduction (monotone in it)."""
        if searched_reduction <= 0:
            return 0.0
        return (self.rest + searched_dense) / (self.rest + searched_dense / searched_reduction)

    def describe(self) -> str:
        """What the whole-model figure counts, in words."""
        left = f"{len(self.outside)} of {self.layers} layers outside the search"
        if self.cost_name == "size":
            return (f"whole model: every tensor of the model ({left}, biases, norms, buffers) at its fp32 size, "
                    "the searched weights as the artifact stores them; the artifact's JSON files and header not "
                    "counted")
        return f"whole model: all {self.layers} linear/conv layers ({left}, at their dense cost); other operations not counted"

