"""Sequential calibration block by block: O(blocks) passes of one block, not O(layers) passes of the model.

``calibration: sequential`` wants each layer's Hessian from the inputs the already compressed layers
before it produce. Deep models are stacks of repeated blocks (decoder / encoder layers, CNN stages),
and a block's input is the previous block's output. So:

1. one probe pass of the first calibration batch through the whole model (hooks only) checks that the
   blocks chain (each block called once, in order, fed the previous block's output; the other
   arguments the same for every block, apart from plain numbers) and finds which selected layers sit
   in which block, which run before the first block and which after the last;
2. the layers before the first block (a CNN's stem) are calibrated and compressed one input at a
   time by passes that stop right after them;
3. the inputs of the first block are captured for every batch, with the keyword arguments the blocks
   need (attention masks, position embeddings; caches off), by passes that stop at the first block;
4. per block: one pass of the block over the cached inputs collects the Hessians of all its layers
   (one accumulator per distinct input tensor), ``compress_fn`` compresses them, and one more pass of
   the compressed block turns the cached inputs into the next block's;
5. the layers after the last block (a classifier head) are calibrated one input at a time by passes
   of the whole model.

Blocks are the modules ``sequential_targets`` names (names, class names or ``re:`` patterns, as in
llm-compressor), else the longest ``nn.ModuleList`` of modules of one class that holds compressible
layers (preferring the classes a Hugging Face model lists in ``_no_split_modules``: its decoder or
encoder layers). Where there is no such list, or the probe finds that the blocks do not chain, the
fallback is the layer-wise path: per distinct layer input, in the order the model calls them, a pass
that stops right after that layer (correct for any feed-forward model, O(layers) partial passes).

Memory: the cached inputs of one block (one activation per calibration sample) and one block's
Hessians. With ``device``, each block is moved there for its passes and back afterwards, and the
cached inputs stay on the model's device (e.g. the CPU) between blocks.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .._progress import progress_bar
from ..recipe import selector_matches
from .calibration import HessianHooks, StopForward, _input_geometry, collect_hessians, run_model
from .layers import LayerInfo, is_compressible

__all__ = ["BlockPlan", "find_blocks", "plan_blocks", "sequential_calibration"]

# Keyword arguments that carry a key/value cache: a block run twice on the same inputs must not grow one.
_CACHE_KWARGS = ("past_key_value", "past_key_values", "layer_past")

CompressFn = Callable[[List[str], Dict[str, torch.Tensor]], None]


def _outermost(hits: Sequence[Tuple[str, nn.Module]]) -> List[Tuple[str, nn.Module]]:
    out: List[Tuple[str, nn.Module]] = []
    for name, module in hits:
        if any(name.startswith(o + ".") for o, _ in out):
            continue
        out.append((name, module))
    return out


def find_blocks(model: nn.Module, sequential_targets: Optional[Sequence[str]] = None) -> Tuple[List[Tuple[str, nn.Module]], str]:
    """``(blocks, how they were found)``: the (name, module) pairs of the model's blocks in model order.

    ``sequential_targets``: module names, class names or ``re:`` patterns; the outermost matching
    modules are the blocks. Otherwise the longest ``nn.ModuleList`` (at least 2 entries) of modules of
    one class holding a compressible layer, those of a class in the model's ``_no_split_modules``
    first. ``([], reason)`` when there is none.
    """
    modules = list(model.named_modules())
    if sequential_targets:
        entries = [sequential_targets] if isinstance(sequential_targets, str) else list(sequential_targets)
        hits = [(n, m) for n, m in modules if n and any(selector_matches(e, n, type(m).__name__) for e in entries)]
        if not hits:
            raise ValueError(f"sequential_targets {entries} match no module of {type(model).__name__}")
        return _outermost(hits), f"sequential_targets {entries}"
    preferred = set(getattr(model, "_no_split_modules", None) or ())
    best = None
    for name, module in modules:
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        kinds = {type(child) for child in module}
        if len(kinds) != 1 or is_compressible(module[0]):
            continue
        if not any(is_compressible(m) for m in module[0].modules()):
            continue
        rank = (type(module[0]).__name__ in preferred, len(module))
        if best is None or rank > best[0]:
            best = (rank, name, module)
    if best is None:
        return [], "no nn.ModuleList of repeated blocks holds a compressible layer"
    _, name, module = best
    prefix = f"{name}." if name else ""
    blocks = [(f"{prefix}{i}", child) for i, child in enumerate(module)]
    return blocks, f"{name or '<root>'}: {len(blocks)} x {type(module[0]).__name__}"


class _NotChainable(Exception):
    """Raised inside the probe's block hooks once the blocks turn out not to chain (caught there)."""


@dataclass
class BlockPlan:
    """What the probe pass found: the blocks and the layers of each, in call order."""

    blocks: List[Tuple[str, nn.Module]]
    found_by: str
    block_layers: List[List[str]] = field(default_factory=list)
    before: List[str] = field(default_factory=list)  # selected layers called before the first block
    after: List[str] = field(default_factory=list)  # ... after the last block
    # Where a block takes the previous block's output: ("arg", 0) or ("kwarg", name).
    hidden_at: Tuple[str, Any] = ("arg", 0)
    # Per block, plain (non-tensor) keyword arguments that differ from the first block's (a rate by depth).
    kwarg_overrides: List[Dict[str, Any]] = field(default_factory=list)
    # Every layer in call order, and per layer the layer whose input (the same tensor) it shares.
    call_order: List[str] = field(default_factory=list)
    shares: Dict[str, str] = field(default_factory=dict)
    reason: Optional[str] = None  # why the blocks cannot be used (then the layer-wise path runs)

    @property
    def chained(self) -> bool:
        return self.reason is None and bool(self.blocks)


def _hidden(args: tuple, kwargs: Mapping[str, Any], at: Optional[Tuple[str, Any]] = None):
    """(location, tensor) of a block's main input: the first positional argument, else the first
    floating-point tensor keyword argument (or the location ``at``)."""
    if at is not None:
        kind, key = at
        if kind == "arg":
            return at, (args[key] if len(args) > key else None)
        return at, kwargs.get(key)
    if args:
        return ("arg", 0), args[0]
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return ("kwarg", k), v
    return ("arg", 0), None


def _output_hidden(out: Any) -> Optional[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


def _extras(args: tuple, kwargs: Mapping[str, Any], at: Tuple[str, Any]) -> Dict[Any, Any]:
    """Everything a block is given besides its main input, by position or keyword."""
    out: Dict[Any, Any] = {("arg", i): v for i, v in enumerate(args) if at != ("arg", i)}
    out.update({("kwarg", k): v for k, v in kwargs.items() if at != ("kwarg", k)})
    return out


def _same_value(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and bool(torch.equal(a, b)))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same_value(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:
        return False


def _plain(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def plan_blocks(model: nn.Module, layers: Mapping[str, LayerInfo], batch: Any,
                sequential_targets: Optional[Sequence[str]] = None) -> BlockPlan:
    """Run ``batch`` through the model once with probing hooks and say how it can be calibrated."""
    blocks, found_by = find_blocks(model, sequential_targets)
    plan = BlockPlan(blocks=blocks, found_by=found_by)
    index = {id(m): i for i, (_, m) in enumerate(blocks)}
    state: Dict[str, Any] = {"active": None, "done": -1, "prev": None, "at": None, "extras0": None}
    where: Dict[str, set] = {name: set() for name in layers}
    first_call: Dict[str, int] = {}
    sources: Dict[str, List[Optional[str]]] = {name: [] for name in layers}
    added: Dict[Tuple, Tuple[Any, str]] = {}
    overrides: List[Dict[str, Any]] = [dict() for _ in blocks]

    def fail(why: str):
        plan.reason = why
        raise _NotChainable

    def checked(hook):
        # After the first problem the pass goes on (every layer's calls are still recorded for the
        # layer-wise fallback), with the block checks off.
        def run(*args):
            if plan.reason is not None:
                return None
            try:
                return hook(*args)
            except _NotChainable:
                return None

        return run

    def block_pre(module, args, kwargs):
        i = index[id(module)]
        name = blocks[i][0]
        if state["active"] is not None:
            fail(f"block {name} is called inside block {blocks[state['active']][0]}")
        if i != state["done"] + 1:
            fail(f"block {name} is called {'again' if i <= state['done'] else 'out of order'} "
                 f"(after {blocks[state['done']][0] if state['done'] >= 0 else 'no block'})")
        at, x = _hidden(args, kwargs, state["at"])
        if not isinstance(x, torch.Tensor):
            fail(f"block {name} has no tensor input to chain")
        if i == 0:
            state["at"] = at
            state["extras0"] = _extras(args, kwargs, at)
        else:
            if x is not state["prev"]:
                fail(f"block {name} is not fed the output of block {blocks[i - 1][0]} (something runs between them)")
            extras = _extras(args, kwargs, at)
            if extras.keys() != state["extras0"].keys():
                fail(f"block {name} is called with other arguments than block {blocks[0][0]}")
            for k, v in extras.items():
                v0 = state["extras0"][k]
                if _same_value(v, v0):
                    continue
                if _plain(v) and _plain(v0) and k[0] == "kwarg":
                    overrides[i][k[1]] = v  # e.g. a drop-connect rate that grows with depth
                    continue
                fail(f"block {name} gets another {k[1]!r} than block {blocks[0][0]}: the blocks cannot share "
                     "the first block's captured arguments")
        state["active"] = i
        return None

    def block_post(module, args, output):
        i = index[id(module)]
        out = _output_hidden(output)
        if out is None:
            fail(f"block {blocks[i][0]} returns {type(output).__name__}, not a tensor (or a tuple starting with one)")
        state["prev"], state["active"], state["done"] = out, None, i
        return None

    def layer_pre(name: str, info: LayerInfo):
        geometry = _input_geometry(info, info.module)

        def hook(module, args, kwargs):
            x = args[0] if args else kwargs.get("input")
            first_call.setdefault(name, len(first_call))
            a = state["active"]
            where[name].add(a if a is not None else ("before" if state["done"] < 0 else
                                                     "after" if state["done"] == len(blocks) - 1 else "between"))
            if isinstance(x, torch.Tensor):
                key = (id(x), x._version, geometry)
                seen = added.get(key)
                same = seen if seen is not None and seen[0]() is x else None
                sources[name].append(same[1] if same is not None else None)
                if same is None:
                    added[key] = (weakref.ref(x), name)
            return None

        return hook

    handles = []
    try:
        for _, m in blocks:
            handles.append(m.register_forward_pre_hook(checked(block_pre), with_kwargs=True))
            handles.append(m.register_forward_hook(checked(block_post)))
        for name, info in layers.items():
            handles.append(info.module.register_forward_pre_hook(layer_pre(name, info), with_kwargs=True))
        run_model(model, batch)
    finally:
        for h in handles:
            h.remove()
    plan.hidden_at = state["at"] or ("arg", 0)
    plan.kwarg_overrides = overrides
    never = [n for n in layers if n not in first_call]
    if never:
        raise ValueError(f"layer {never[0]}: received no inputs during calibration (its forward was never called "
                         "by the model)")
    plan.call_order = sorted(layers, key=lambda n: first_call[n])
    calls = {n: len(s) for n, s in sources.items()}
    for name, src in sources.items():
        owners = set(src)
        if len(owners) == 1 and None not in owners:
            owner = owners.pop()
            if calls[owner] == calls[name] and sources[owner].count(None) == calls[owner]:
                plan.shares[name] = owner
    if plan.reason is None and blocks and state["done"] != len(blocks) - 1:
        plan.reason = f"block {blocks[state['done'] + 1][0]} was not called"
    if plan.reason is None and not blocks:
        plan.reason = found_by
    plan.block_layers = [[] for _ in blocks]
    if plan.reason is None:
        for name in plan.call_order:
            w = where[name]
            if len(w) != 1 or "between" in w:
                plan.reason = (f"layer {name} is called " + ("between two blocks" if "between" in w else
                                                              "in more than one block or outside them"))
                break
            (place,) = w
            if place == "before":
                plan.before.append(name)
            elif place == "after":
                plan.after.append(name)
            else:
                bname = blocks[place][0]
                if name != bname and not name.startswith(bname + "."):
                    plan.reason = f"layer {name} is called inside block {bname} but is not part of it"
                    break
                plan.block_layers[place].append(name)
    if plan.reason is not None:
        plan.block_layers, plan.before, plan.after = [[] for _ in blocks], [], []
    return plan


# ------------------------------------------------------------------------------------------------


def _to(obj: Any, device: Optional[torch.device]) -> Any:
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        items = [_to(v, device) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    if isinstance(obj, list):
        return [_to(v, device) for v in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _module_device(module: nn.Module) -> Optional[torch.device]:
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return None


def _groups(names: Sequence[str], shares: Mapping[str, str]) -> List[List[str]]:
    """Layers grouped by the input they share: [owner, members...] in the order of ``names``."""
    groups: Dict[str, List[str]] = {}
    for n in names:
        groups.setdefault(shares.get(n, n), []).append(n)
    return list(groups.values())


class _Capture:
    """A forward pre-hook on the first block that keeps its arguments and ends the pass."""

    def __init__(self, block: nn.Module, keep_on: Optional[torch.device]):
        self.keep_on = keep_on
        self.inputs: Optional[Tuple[tuple, dict]] = None
        self.handle = block.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        kwargs = dict(kwargs)
        for k in _CACHE_KWARGS:
            if k in kwargs:
                kwargs[k] = None
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        self.inputs = (_to(tuple(args), self.keep_on), _to(kwargs, self.keep_on))
        raise StopForward


def _with_hidden(inputs: Tuple[tuple, dict], at: Tuple[str, Any], x: torch.Tensor) -> Tuple[tuple, dict]:
    args, kwargs = inputs
    if at[0] == "arg":
        args = args[:at[1]] + (x,) + args[at[1] + 1:]
    else:
        kwargs = dict(kwargs, **{at[1]: x})
    return args, kwargs


def sequential_calibration(
    model: nn.Module,
    layers: Mapping[str, LayerInfo],
    batches: Sequence[Any],
    compress_fn: CompressFn,
    *,
    sequential_targets: Optional[Sequence[str]] = None,
    device: Optional[torch.device] = None,
    progress: bool = True,
    log: Optional[Callable[[str], None]] = None,
) -> Dict[str, Any]:
    """Calibrate and compress ``layers`` sequentially: ``compress_fn(names, hessians)`` is called for
    each group of layers whose Hessians are ready (a block's layers, or the layers sharing one input)
    and must write their compressed weights into the model before it returns.

    Returns what ran: ``{"path": "blocks" | "layers", "found_by", "reason", "blocks", "model_passes",
    "block_passes", "shared_inputs", "seconds": {phase: wall s}, "cpu_seconds": {phase: CPU s}}``. The train/eval flags and a Hugging Face ``config.use_cache`` are restored.
    """
    log = log or (lambda msg: None)
    modes = [(m, m.training) for m in model.modules()]
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None) if config is not None else None
    if use_cache is not None:
        config.use_cache = False
    model.eval()
    seconds = {"probe": 0.0, "hessians": 0.0, "propagate": 0.0, "capture": 0.0, "layerwise": 0.0}
    cpu = dict(seconds)  # the same phases in CPU seconds of this process (fair on a loaded machine)
    # Passes of the whole model (the probe, the capture, the layer-wise ones: those stop early) and of one block.
    info: Dict[str, Any] = {"model_passes": 0, "block_passes": 0, "seconds": seconds, "cpu_seconds": cpu}

    class phase:
        def __init__(self, name):
            self.name = name

        def __enter__(self):
            self.t, self.c = time.perf_counter(), time.process_time()

        def __exit__(self, *exc):
            seconds[self.name] += time.perf_counter() - self.t
            cpu[self.name] += time.process_time() - self.c

    try:
        with torch.no_grad():
            with phase("probe"):
                plan = plan_blocks(model, layers, batches[0], sequential_targets)
            info["model_passes"] += 1
            info.update(found_by=plan.found_by, reason=plan.reason, blocks=len(plan.blocks),
                        shared_inputs=dict(plan.shares))

            def layerwise(names: Sequence[str], what: str) -> None:
                """One pass per distinct input, stopped right after it (the fallback, and the
                layers outside the blocks)."""
                groups = _groups(names, plan.shares)
                bar = progress_bar(groups, desc=what, unit="input", leave=False, progress=progress)
                for group in bar:
                    bar.set_postfix_str(", ".join(group)[:60])
                    with phase("layerwise"):
                        H = collect_hessians(model, {group[0]: layers[group[0]]}, batches, stop_early=True)[group[0]]
                    info["model_passes"] += 1
                    compress_fn(group, {n: H for n in group})
                    del H
                bar.close()

            if not plan.chained:
                info["path"] = "layers"
                log(f"sequential calibration layer by layer ({len(layers)} layers): {plan.reason}")
                layerwise(plan.call_order, "calibrate layers")
                return info
            info["path"] = "blocks"
            n_in = sum(len(b) for b in plan.block_layers)
            log(f"sequential calibration block by block: {len(plan.blocks)} blocks ({plan.found_by}), {n_in} layers "
                f"in them, {len(plan.before)} before, {len(plan.after)} after")
            if plan.before:
                layerwise(plan.before, "calibrate layers before the blocks")
            keep_on = _module_device(plan.blocks[0][1])
            cache: List[Tuple[tuple, dict]] = []
            cap = _Capture(plan.blocks[0][1], keep_on)
            try:
                with phase("capture"):
                    for batch in progress_bar(batches, desc="capture block inputs", unit="batch", leave=False,
                                              progress=progress):
                        cap.inputs = None
                        try:
                            run_model(model, batch)
                        except StopForward:
                            pass
                        if cap.inputs is None:
                            raise ValueError(f"block {plan.blocks[0][0]} was not called on a calibration batch")
                        cache.append(cap.inputs)
            finally:
                cap.handle.remove()
            info["model_passes"] += 1
            at = plan.hidden_at
            bar = progress_bar(list(enumerate(plan.blocks)), desc="blocks", unit="block", progress=progress)
            for i, (bname, block) in bar:
                home = _module_device(block)
                run_on = device if device is not None else home
                if run_on is not None and home is not None and run_on != home:
                    block.to(run_on)
                try:
                    extra = plan.kwarg_overrides[i]

                    def run(inputs):
                        args, kwargs = _to(inputs, run_on if run_on != keep_on else None)
                        return block(*args, **(dict(kwargs, **extra) if extra else kwargs))

                    names = plan.block_layers[i]
                    if names:
                        bar.set_postfix_str(f"{bname}: Hessians of {len(names)} layers")
                        with phase("hessians"), HessianHooks({n: layers[n] for n in names}) as hooks:
                            for inputs in cache:
                                hooks.begin_batch()
                                run(inputs)
                        hessians = hooks.hessians()
                        del hooks
                        bar.set_postfix_str(f"{bname}: compressing {len(names)} layers")
                        compress_fn(list(names), hessians)
                        del hessians
                    if i + 1 < len(plan.blocks):
                        bar.set_postfix_str(f"{bname}: inputs of the next block")
                        with phase("propagate"):
                            for j, inputs in enumerate(cache):
                                out = _output_hidden(run(inputs))
                                cache[j] = _with_hidden(inputs, at, _to(out, keep_on if keep_on != run_on else None))
                finally:
                    if run_on is not None and home is not None and run_on != home:
                        block.to(home)
                info["block_passes"] += int(bool(names)) + int(i + 1 < len(plan.blocks))
            bar.close()
            del cache
            if plan.after:
                layerwise(plan.after, "calibrate layers after the blocks")
            return info
    finally:
        for m, training in modes:
            m.training = training
        if use_cache is not None:
            config.use_cache = use_cache
