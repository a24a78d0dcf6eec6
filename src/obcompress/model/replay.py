"""Replaying the part of a forward pass that a change to one layer cannot reach.

Scoring a layer's variants one at a time (the single-layer swaps of the calibration-loss score)
re-runs the whole model once per variant, yet everything the model computes before the swapped
layer is first called is the same for every variant. ``PrefixReplay`` records, from one dense pass,
the modules whose one call per forward ends before that layer starts; while it is active those
modules return their recorded outputs instead of computing them, so a forward pass costs only the
suffix from the layer on. Ops between modules (a residual add, a mask built in the parent's
forward) still run: they see the same inputs as before.

What the replay relies on: the model's calls are the same from batch to batch and from pass to
pass (no data-dependent control flow ahead of the layer), and a skipped module leaves no state that
later code reads. A model outside this is caught rather than trusted: the caller runs the replayed
dense model once and compares it with a full pass (``search.nonuniform.CalibrationLoss.replay``),
and falls back to full passes when they differ.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.utils._pytree import tree_map

__all__ = ["PrefixReplay", "call_intervals"]


def call_intervals(model: nn.Module, run: Callable[[], Any]) -> Dict[str, List[Tuple[int, int]]]:
    """(start, end) event counts of every call of every submodule during ``run()``, by name."""
    clock = [0]
    stacks: Dict[str, List[int]] = {}
    calls: Dict[str, List[Tuple[int, int]]] = {}
    handles = []

    def pre(name):
        def hook(module, args):
            clock[0] += 1
            stacks.setdefault(name, []).append(clock[0])
        return hook

    def post(name):
        def hook(module, args, out):
            clock[0] += 1
            calls.setdefault(name, []).append((stacks[name].pop(), clock[0]))
        return hook

    try:
        for name, m in model.named_modules():
            if name:
                handles.append(m.register_forward_pre_hook(pre(name)))
                handles.append(m.register_forward_hook(post(name)))
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return calls


def _clone(out: Any) -> Any:
    # A recorded output handed on as it is could be changed in place downstream (x += shortcut, an
    # in-place activation) and be wrong from the next pass on.
    return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, out)


class PrefixReplay:
    """Recorded outputs of the modules that run before ``layer`` in ``model``.

    ``runs``: one callable per calibration batch, each a forward pass of ``model`` on its batch
    (what the caller measures). ``with replay.active(i):`` around the run of batch ``i`` makes the
    recorded modules return batch ``i``'s outputs. ``skipped``: the names of the replayed modules
    (the largest ones: a module inside a replayed one is skipped with it). ``calls``: the model's
    ``call_intervals`` when the caller has them (they do not depend on the layer).
    """

    def __init__(self, model: nn.Module, layer: str, runs: Sequence[Callable[[], Any]],
                 calls: Optional[Dict[str, List[Tuple[int, int]]]] = None):
        modules = dict(model.named_modules())
        if layer not in modules:
            raise KeyError(f"layer {layer!r} is not a module of the model")
        if calls is None:
            calls = call_intervals(model, runs[0])
        if layer not in calls:
            raise ValueError(f"layer {layer!r} is not called in the model's forward pass")
        start = calls[layer][0][0]
        # Called once per pass and over before the layer starts: the same output for every variant.
        before = {n: c[0] for n, c in calls.items() if len(c) == 1 and c[0][1] < start}
        self.skipped = [n for n, (s, e) in before.items()
                        if not any(s2 < s and e < e2 for m, (s2, e2) in before.items() if m != n)]
        self._modules = {n: modules[n] for n in self.skipped}
        self.outputs: List[Dict[str, Any]] = []
        if self.skipped:
            for run in runs:
                got: Dict[str, Any] = {}
                handles = [m.register_forward_hook(self._keep(got, n)) for n, m in self._modules.items()]
                try:
                    with torch.no_grad():
                        run()
                finally:
                    for h in handles:
                        h.remove()
                self.outputs.append(got)

    @staticmethod
    def _keep(got: Dict[str, Any], name: str):
        def hook(module, args, out):
            got[name] = _clone(out)
        return hook

    def active(self, index: int) -> "_Active":
        return _Active(self, index)


class _Active:
    def __init__(self, replay: PrefixReplay, index: int):
        self.replay = replay
        self.index = index
        self.saved: Dict[str, Optional[Any]] = {}

    def __enter__(self):
        outs = self.replay.outputs[self.index] if self.replay.skipped else {}
        for name, m in self.replay._modules.items():
            # An instance attribute shadows the class's forward; one already there (a wrapper's
            # patch) is put back on exit.
            self.saved[name] = m.__dict__.get("forward")
            out = outs[name]
            m.forward = lambda *a, _out=out, **k: _clone(_out)
        return self

    def __exit__(self, *exc):
        for name, m in self.replay._modules.items():
            if self.saved[name] is None:
                del m.forward
            else:
                m.forward = self.saved[name]
        return False
