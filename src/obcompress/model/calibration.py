"""Calibration data -> model inputs, and forward hooks that turn each layer's inputs into its Hessian.

Memory: ``calibration_batches`` keeps the model inputs of the calibration samples (that is the
calibration set itself). ``HessianHooks`` keeps only one running float64 Hessian per distinct layer
input, ``groups x cols x cols``: layers fed by the very same tensor with the same geometry (q/k/v
projections, gate/up, a conv's branches of one kernel) share one accumulator, which is also one
GEMM per sample instead of one per layer. Activations are folded into it as they pass and never
stored (a conv input is unfolded in bounded chunks by the accumulator).
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from .._progress import progress_bar
from ..solvers.hessian import HessianAccumulator, all_finite
from .layers import LayerInfo

__all__ = ["HessianHooks", "StopForward", "calibration_batches", "collect_hessians", "count_samples", "run_model",
           "take_samples"]

# Collated samples from a torch Dataset come in batches of this size.
_DATASET_BATCH_SIZE = 32


def _default_input(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("a calibration batch is an empty tuple/list: expected (inputs, targets)")
        return batch[0]
    if isinstance(batch, Mapping):
        # A dict batch holds keyword arguments of the model; labels would make HF models compute a loss.
        return {k: v for k, v in batch.items() if k != "labels"}
    raise ValueError(
        f"cannot use a calibration batch of type {type(batch).__name__}: expected a tensor, an (inputs, targets) "
        "pair or a dict of model keyword arguments; pass transform_fn to map your batches to model inputs"
    )


def _leading_tensor(inputs: Any) -> Optional[torch.Tensor]:
    if isinstance(inputs, torch.Tensor):
        return inputs
    values = inputs.values() if isinstance(inputs, Mapping) else inputs if isinstance(inputs, (tuple, list)) else ()
    for v in values:
        if isinstance(v, torch.Tensor):
            return v
    return None


def count_samples(inputs: Any) -> int:
    t = _leading_tensor(inputs)
    if t is None:
        raise ValueError(
            f"cannot count the samples in model inputs of type {type(inputs).__name__}: expected a tensor, "
            "a tuple of tensors or a dict of tensors whose leading dimension is the batch"
        )
    if t.dim() == 0:
        raise ValueError("a calibration input is a 0-d tensor: its leading dimension must be the batch")
    return int(t.shape[0])


def take_samples(inputs: Any, n: int, batch_size: int) -> Any:
    """The first n samples: every tensor (or list) whose leading dimension is the batch is sliced."""

    def cut(v):
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch_size:
            return v[:n]
        if isinstance(v, list) and len(v) == batch_size:
            return v[:n]
        return v

    if isinstance(inputs, torch.Tensor):
        return inputs[:n]
    if isinstance(inputs, Mapping):
        return {k: cut(v) for k, v in inputs.items()}
    if isinstance(inputs, tuple):
        cuts = [cut(v) for v in inputs]
        return type(inputs)(*cuts) if hasattr(inputs, "_fields") else tuple(cuts)  # namedtuples take positional args
    return [cut(v) for v in inputs]


def calibration_batches(
    dataset: Iterable,
    num_samples: int,
    transform_fn: Optional[Callable[[Any], Any]] = None,
) -> List[Any]:
    """Model inputs for ``num_samples`` calibration samples, as a list of batches.

    ``dataset`` is any iterable of batches (a DataLoader, a list, a generator). A torch ``Dataset``
    yields single samples, so it is batched with a DataLoader first. A batch may be a tensor, an
    ``(x, y)`` / ``[x, y]`` pair (x is the input) or a dict of model keyword arguments (``labels``
    dropped); ``transform_fn(batch)`` replaces that rule. The leading dimension counts samples;
    whole batches are taken and the last one is sliced; then one batch more is read, only to warn
    when data is left unused. Fewer samples than asked gives a warning and uses what there is.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_calibration_samples must be a positive integer, got {num_samples!r}")
    if transform_fn is not None and not callable(transform_fn):
        raise ValueError(f"transform_fn must be callable, got {type(transform_fn).__name__}")
    if isinstance(dataset, torch.utils.data.Dataset):
        dataset = torch.utils.data.DataLoader(dataset, batch_size=min(num_samples, _DATASET_BATCH_SIZE))
    try:
        iterator = iter(dataset)
    except TypeError:
        raise ValueError(f"calibration data must be iterable (a DataLoader, list or generator), got {type(dataset).__name__}") from None

    batches: List[Any] = []
    seen = 0
    left = 0  # samples known to be left unused
    for batch in iterator:
        inputs = transform_fn(batch) if transform_fn is not None else _default_input(batch)
        n = count_samples(inputs)
        if n == 0:
            continue
        if seen + n > num_samples:
            left = seen + n - num_samples
            inputs = take_samples(inputs, num_samples - seen, n)
            n = num_samples - seen
        batches.append(inputs)
        seen += n
        if seen >= num_samples:
            break
    if not batches:
        raise ValueError("calibration data is empty: the dataset yielded no samples")
    if seen >= num_samples and not left:
        # One batch more tells whether the data held more than is used (it is not kept).
        for batch in iterator:
            inputs = transform_fn(batch) if transform_fn is not None else _default_input(batch)
            left += count_samples(inputs)
            if left:
                break
    if left:
        warnings.warn(
            f"using {num_samples} calibration samples; the data holds more (at least {left} left unused): "
            "raise num_calibration_samples / --calibration-samples to use them",
            UserWarning,
            stacklevel=2,
        )
    if seen < num_samples:
        warnings.warn(
            f"asked for {num_samples} calibration samples but the data has only {seen}; using {seen}",
            UserWarning,
            stacklevel=2,
        )
    return batches


def model_dtype(model: nn.Module) -> Optional[torch.dtype]:
    """The floating dtype of all of the model's parameters, or None when they mix dtypes (or
    there is no floating parameter)."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


def _cast_floats(batch: Any, dtype: torch.dtype) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(dtype) if batch.is_floating_point() and batch.dtype != dtype else batch
    if isinstance(batch, Mapping):
        return {k: _cast_floats(v, dtype) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_cast_floats(v, dtype) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(_cast_floats(v, dtype) for v in batch)
    return batch


def _float_dtypes(batch: Any) -> set:
    if isinstance(batch, torch.Tensor):
        return {batch.dtype} if batch.is_floating_point() else set()
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else ()
    out = set()
    for v in values:
        out |= _float_dtypes(v)
    return out


def run_model(model: nn.Module, batch: Any) -> Any:
    """``model(*batch)`` for a tuple/list, ``model(**batch)`` for a dict, else ``model(batch)``.

    Floating inputs of another dtype than the model's weights (float32 data into a float64 model)
    are cast to the weights' dtype, with a warning that says so: torch would stop inside the
    model's first layer instead."""
    dtype = model_dtype(model)
    if dtype is not None:
        other = _float_dtypes(batch) - {dtype}
        if other:
            names = ", ".join(sorted(str(d).replace("torch.", "") for d in other))
            warnings.warn(f"calibration inputs are {names}, the model's weights {str(dtype).replace('torch.', '')}: "
                          "casting the inputs to the weights' dtype", UserWarning, stacklevel=2)
            batch = _cast_floats(batch, dtype)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _input_geometry(info: LayerInfo, module: nn.Module) -> Tuple:
    """What, besides the input tensor itself, decides a layer's Hessian: two layers with equal
    geometry fed by the same tensor have the same H."""
    if info.kind in ("linear", "conv1d_hf"):
        return ("linear", info.cols)
    m = module
    return (info.kind, info.cols, info.groups, tuple(m.kernel_size), tuple(m.stride),
            m.padding if isinstance(m.padding, str) else tuple(m.padding), tuple(m.dilation), m.padding_mode)


class HessianHooks:
    """Context manager: forward pre-hooks that accumulate each layer's Hessian from its inputs.

    ``with HessianHooks(layers) as hooks: run the model ...; H = hooks.hessians()``. Every call of a
    layer adds its input: rows of a linear input (any leading dimensions), every output position of
    a conv input, unfolded with the layer's own kernel, stride, padding, dilation, groups and
    padding mode. The hooks are removed on exit, also when the forward pass raised.

    Shared inputs: on the first batch every layer accumulates its own H and records, call by call,
    whether its input is the very tensor (same object, same geometry) that another layer added
    earlier in the same pass. A layer whose every call repeats one other layer's input (q/k/v after
    q, up after gate) then drops its accumulator and uses that layer's (``shared``: name -> owner),
    and on later batches adds nothing. The caller marks batches with ``begin_batch()``; a later
    batch on which such a layer is fed anything else is an error (its H would be wrong).
    """

    def __init__(self, layers: Dict[str, LayerInfo], *, share_inputs: bool = True):
        if not isinstance(layers, Mapping) or not layers:
            raise ValueError("HessianHooks needs a non-empty dict of name -> LayerInfo (see find_layers)")
        for name, info in layers.items():
            if not isinstance(info, LayerInfo):
                raise ValueError(f"layer {name!r}: expected a LayerInfo, got {type(info).__name__}")
        self.layers = dict(layers)
        self._accumulators = {name: HessianAccumulator(info.cols, info.groups) for name, info in self.layers.items()}
        self._handles: list = []
        # Calls of each layer in the current forward pass; with ``stop_at`` set, the pass is cut
        # (``StopForward``) once every layer has had that many calls: the rest of the model is not needed.
        self.calls: Dict[str, int] = {name: 0 for name in self.layers}
        self.stop_at: Optional[Dict[str, int]] = None
        self.share_inputs = share_inputs
        self.shared: Dict[str, str] = {}  # layer -> the layer whose accumulator it uses
        self._batches = 0
        # Inputs added in the current batch: (id, geometry) -> (weak reference, layer that added it).
        self._added: Dict[Tuple, Tuple[Any, str]] = {}
        # First batch: per layer and call, the layer that had already added that same input (or None).
        self._sources: Dict[str, List[Optional[str]]] = {name: [] for name in self.layers}

    def __enter__(self) -> "HessianHooks":
        try:
            for name, info in self.layers.items():
                self._handles.append(info.module.register_forward_pre_hook(self._make_hook(name, info), with_kwargs=True))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def begin_batch(self) -> None:
        """Mark the start of a batch (one forward pass); after the first, shared inputs are settled."""
        if self._batches == 1 and self.share_inputs:
            self._settle_shared()
        self._batches += 1
        self._added = {}
        self.calls = dict.fromkeys(self.calls, 0)

    def _settle_shared(self) -> None:
        calls = {n: len(src) for n, src in self._sources.items()}
        for name, src in self._sources.items():
            owners = set(src)
            if len(owners) != 1 or None in owners:
                continue
            owner = owners.pop()
            # The owner must have added exactly these inputs and no others.
            if calls[owner] != calls[name] or self._sources[owner].count(None) != calls[owner]:
                continue
            self._accumulators[name] = self._accumulators[owner]
            self.shared[name] = owner
        self._sources = {}

    def _make_hook(self, name: str, info: LayerInfo):
        geometry = _input_geometry(info, info.module)

        def hook(module, args, kwargs):
            x = args[0] if args else kwargs.get("input")
            if not isinstance(x, torch.Tensor):
                raise ValueError(f"layer {name}: its input is not a tensor ({type(x).__name__})")
            # The version counter tells an input modified in place since it was added.
            key = (id(x), x._version, geometry)
            seen = self._added.get(key)
            same = seen if seen is not None and seen[0]() is x else None
            owner = self.shared.get(name)
            if owner is not None:
                if same is None or same[1] != owner:
                    raise ValueError(
                        f"layer {name}: on the first calibration batch it was fed the same tensor as layer {owner} "
                        f"and shares its Hessian, but on batch {self._batches - 1} it was fed another: the model's "
                        "data flow depends on the data; calibrate with HessianHooks(..., share_inputs=False)")
                self._count(name)
                return None
            if self._batches <= 1 and self.share_inputs:
                self._sources[name].append(same[1] if same is not None else None)
            if same is None:
                self._added[key] = (weakref.ref(x), name)
            self._add(name, info, module, x)
            self._count(name)
            return None

        return hook

    def _add(self, name: str, info: LayerInfo, module: nn.Module, x: torch.Tensor) -> None:
        acc = self._accumulators[name]
        if x.is_floating_point() and not all_finite(x):
            bad = int((~torch.isfinite(x)).sum())
            raise ValueError(
                f"layer {name}: non-finite activations ({bad} NaN/inf values in its input); "
                "the calibration data or an earlier layer overflowed"
            )
        try:
            if info.kind in ("linear", "conv1d_hf"):
                if x.dim() == 0 or x.shape[-1] != info.cols:
                    raise ValueError(f"expected {info.cols} input features in the last dimension")
                acc.add(x.reshape(-1, info.cols))
            else:
                m = module
                if x.dim() == (2 if info.kind == "conv1d" else 3):  # unbatched input
                    x = x.unsqueeze(0)
                acc.add_conv_input(x, m.kernel_size, m.stride, m.padding, m.dilation, m.groups, m.padding_mode)
        except (ValueError, RuntimeError) as exc:
            raise ValueError(f"layer {name}: cannot accumulate its input of shape {tuple(x.shape)}: {exc}") from None

    def _count(self, name: str) -> None:
        self.calls[name] += 1
        if self.stop_at is not None and all(self.calls[n] >= k for n, k in self.stop_at.items()):
            raise StopForward

    def nsamples(self) -> Dict[str, int]:
        """Samples (rows, or conv output positions) each layer's Hessian has seen so far."""
        return {name: acc.nsamples for name, acc in self._accumulators.items()}

    def hessians(self) -> Dict[str, torch.Tensor]:
        """name -> float64 H of shape (groups, cols, cols), groups == 1 included. Layers that share
        an input get the same tensor object (read it, do not modify it in place)."""
        out: Dict[str, torch.Tensor] = {}
        made: Dict[int, torch.Tensor] = {}
        for name, acc in self._accumulators.items():
            if acc.nsamples == 0:
                raise ValueError(
                    f"layer {name}: received no inputs during calibration (its forward was never called by the model)"
                )
            if id(acc) not in made:
                H = acc.hessian()
                made[id(acc)] = H.unsqueeze(0) if acc.groups == 1 else H
            out[name] = made[id(acc)]
        return out


class StopForward(BaseException):
    """Raised by the Hessian hooks to cut a forward pass whose remaining layers are not needed
    (a BaseException, so that a model's own ``except Exception`` cannot swallow it)."""


def collect_hessians(model: nn.Module, layers: Dict[str, LayerInfo], batches: Iterable[Any], *,
                     stop_early: bool = False, progress: bool = False, desc: str = "calibrate") -> Dict[str, torch.Tensor]:
    """One no-grad pass of the model in eval mode over ``batches``; name -> H (groups, cols, cols).

    Every layer sees the inputs the model as it is now gives it (the dense model: the 'parallel'
    calibration mode). ``stop_early``: the first batch runs the whole model and counts the calls
    of each hooked layer; every later batch stops as soon as those calls are done (a layer early
    in the network then costs a fraction of a forward pass). This assumes that the number of
    calls of a layer per batch does not depend on the data (true of feed-forward CNNs and
    transformers): a batch that ends with fewer calls is an error; one that would call a layer more
    often than the first batch cannot be told apart, so leave ``stop_early`` off for models with
    data-dependent control flow. The train/eval flag of every submodule is restored. ``progress``:
    a bar over the batches. Layers fed by the same tensor share one H (see ``HessianHooks``).
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with HessianHooks(layers) as hooks, torch.no_grad():
            count = 0
            first_calls: Dict[str, int] = {}
            items = progress_bar(batches, desc=desc, unit="batch", leave=False, progress=progress)
            for batch in items:
                hooks.begin_batch()
                if stop_early and count > 0:
                    hooks.stop_at = first_calls
                    try:
                        run_model(model, batch)
                    except StopForward:
                        pass
                    finally:
                        hooks.stop_at = None
                    short = {n: c for n, c in hooks.calls.items() if c < first_calls[n]}
                    if short:
                        raise ValueError(
                            f"calibration batch {count}: layers {sorted(short)[:3]} were called fewer times than on "
                            "the first batch: their calls depend on the data; calibrate without stop_early")
                else:
                    run_model(model, batch)
                    first_calls = dict(hooks.calls)
                count += 1
        if count == 0:
            raise ValueError("no calibration batches: collect_hessians needs at least one batch of model inputs")
        return hooks.hessians()
    finally:
        for m, training in modes:
            m.training = training
