"""ONNX export of a compressed model: integer weights behind DequantizeLinear, Q/DQ on quantized inputs.

``export_onnx(model, example_inputs, path, result=... | artifact_dir=...)`` traces the model with
torch's exporter (``torch.onnx.export(dynamo=True)``, graph optimisation off so that every weight
reaches the graph unchanged, BatchNorm included), then rewrites the graph for each compressed layer:

- quantized weight: the float initializer is replaced by the layer's integer codes (int8, or int4
  for grids of at most 4 bits with ``weight_format="auto"`` at opset >= 21), a scale and a zero
  point, and a ``DequantizeLinear`` that yields the float weight. int4 codes are shifted by
  2^(bits-1) into the signed range, so a symmetric grid has zero point 0; "int8" codes are stored
  as ONNX uint8 with their zero point (2^(bits-1) for a symmetric grid), which onnxruntime runs
  with its u8u8 integer kernels: exact on every x86 CPU, where its u8s8 kernels saturate on AVX2
  without VNNI (see ``_to_int_tensor``). Granularity follows the grid:
  one scale per tensor, per output channel (``axis``), or per group of input columns (blocked
  quantization, ``block_size``, opset >= 21). A ``Transpose`` of the weight (how the exporter
  feeds a linear layer to ``MatMul``) is folded into the integer initializer.
- W+A: the layer's input passes ``QuantizeLinear`` -> ``DequantizeLinear`` (uint8 codes) with the
  calibrated scale and zero point; a quantizer of fewer than 8 bits clips the input to its range
  first, which is what clamping its codes does.
- pruned weights stay zeros: a pruned weight's code is the zero point, which dequantizes to 0 exactly;
  a pruned layer without quantization keeps its float initializer, zeros included.
- W+A exports (``fold_batchnorm``): BatchNorm after a conv with int8 weights is folded into the
  weight's DequantizeLinear scale and the bias, a zero Pad in front of a conv becomes its padding,
  and clamps (ReLU6) between a conv and the next layer's input quantizer are dropped where that
  quantizer's range already does their work, else preceded by a Q/DQ pair with its parameters:
  onnxruntime then runs those convs as QLinearConv. All exact up to float rounding.

Every integer initializer is checked before writing: decoded with ONNX's rule ``(q - zero) * scale``
in float32 it must equal the model's weight bit for bit (the same arithmetic as
``QuantGrid.decode``), before any BatchNorm is folded into its scale. Whatever cannot be
expressed -- a weight the exporter folded or uses in another op, act-order column groups, a group
grid below opset 21, a non-float32 weight -- is a ValueError naming the layer, never a silently
dense or different graph.

onnxruntime (1.32 measured) rewrites ``DequantizeLinear`` -> ``MatMul`` into its ``MatMulNBits``
kernel (int4 and int8 weights), by default at accuracy level 4, which quantizes the activations
to int8 per block at run time: outputs then differ from the PyTorch model by about 0.5 % relative.
It also rounds the float bias of a Conv/Gemm whose input and weight are both dequantized to
int32 steps (input scale x weight scale), which its integer kernels need (a folded BatchNorm's
shift is in that bias). ``ort_session(..., exact=True)`` turns both off; outputs then match
PyTorch to float32 rounding, and no conv runs as QLinearConv.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from ..files import write_bytes
from ..model import activations as _activations
from ..model.activations import ActivationQuantizer, quantizers_from_dict
from ..model.layers import LayerInfo, find_layers
from .artifact import (
    CODES,
    MASK_CODES,
    _column_groups,
    _decode,
    _expect,
    _layer_key,
    _read_weights,
    _rebuild_layer,
    read_config,
)
from .packing import packed_size, unpack_bits, unpack_mask

__all__ = ["OnnxExport", "WEIGHT_FORMATS", "export_dense_onnx", "export_onnx", "onnx_layer_latency",
           "ort_optimized_ops", "ort_session"]

WEIGHT_FORMATS = ("int8", "auto")
MIN_OPSET = 18  # the oldest opset torch's exporter writes
BLOCKED_OPSET = 21  # blocked DequantizeLinear and the 4-bit integer types
DEFAULT_OPSET = 21
_WEIGHT_OPS = {"Conv": 1, "Gemm": 1, "MatMul": None}
# Ops that read only the weight's shape (e.g. "same" padding computed from the kernel size): the
# dequantized weight has the same shape, so they stay as they are.
_SHAPE_OPS = ("Shape", "Size")


@dataclass
class OnnxExport:
    """What ``export_onnx`` wrote: the file, its size and how each compressed layer is stored."""

    path: Path
    bytes: int
    opset: int
    dynamic_batch: bool
    # name -> {"weight": "int8" | "int4" | "float", "bits", "granularity", "activation_bits"};
    # "int8" is 8-bit codes, stored as ONNX uint8 with a zero point
    layers: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    # fold_batchnorm: name -> what was folded into its Conv or around it ("BatchNormalization", "Pad",
    # "Clip"/"Relu" (absorbed by the next quantizer) or "QuantizeLinear" (a Q/DQ pair on its output))
    folded: Dict[str, List[str]] = field(default_factory=dict)
    # layers whose Conv reads a dequantized input and int8 weight and feeds exactly one QuantizeLinear:
    # what onnxruntime runs as QLinearConv (in sessions that let it quantize the bias, see ort_session).
    # onnxruntime may find more: it moves Q/DQ across MaxPool and reshapes itself (ort_optimized_ops).
    integer_ready: List[str] = field(default_factory=list)


@dataclass
class _Layer:
    """One compressed layer as the exporter needs it; codes is None for a float (pruned-only) layer."""

    name: str
    info: LayerInfo
    codes: Optional[torch.Tensor] = None  # (G, R, C) uint8, 0..2^bits-1
    scale: Optional[torch.Tensor] = None  # (G, R or 1, n_groups) float32
    zero: Optional[torch.Tensor] = None  # like scale (float32 integers)
    bits: Optional[int] = None
    group_size: Optional[int] = None
    strategy: Optional[str] = None


# ---------------------------------------------------------------------------------------------
# checks of the arguments


def _require_onnx() -> None:
    import importlib.util

    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"the ONNX export needs {' and '.join(missing)}: pip install 'obcompress[onnx]'")


def _check_common(model, path, opset) -> Tuple[Path, int]:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ValueError(f"path must be a file path, got {path!r}")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory; give the .onnx file to write")
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
        raise ValueError(f"opset must be an integer in {MIN_OPSET}..{newest} (the installed onnx), got {opset!r}")
    return path, opset


def _split_inputs(example_inputs) -> Tuple[tuple, dict]:
    """(args, kwargs) of the model call, from a tensor, a tuple/list of tensors or a dict of them."""
    if isinstance(example_inputs, torch.Tensor):
        args, kwargs = (example_inputs,), {}
    elif isinstance(example_inputs, (tuple, list)) and example_inputs:
        args, kwargs = tuple(example_inputs), {}
    elif isinstance(example_inputs, Mapping) and example_inputs:
        args, kwargs = (), dict(example_inputs)
    else:
        raise ValueError("example_inputs must be a tensor, a non-empty tuple of tensors or a non-empty dict of "
                         f"keyword tensors, got {type(example_inputs).__name__}")
    for where, t in [(f"example_inputs[{i}]", a) for i, a in enumerate(args)] + \
                    [(f"example_inputs[{k!r}]", v) for k, v in kwargs.items()]:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{where} must be a tensor, got {type(t).__name__}")
        if t.dim() == 0:
            raise ValueError(f"{where} is a scalar; model inputs need a batch dimension")
    return args, kwargs


# ---------------------------------------------------------------------------------------------
# what each layer holds


def _native(info: LayerInfo) -> torch.Tensor:
    w = info.module.weight.detach()
    if info.kind == "conv1d_hf":
        w = w.t()
    return w.reshape(info.groups, info.rows, info.cols).cpu()


def _layers_from_result(model: nn.Module, result) -> Tuple[Dict[str, _Layer], Dict[str, ActivationQuantizer]]:
    states = getattr(result, "states", None)
    if not isinstance(states, dict) or not states:
        raise ValueError("result must be the Result that compress() returned, with at least one compressed layer")
    owned = {id(m) for m in model.modules()}
    layers = {}
    for name, state in states.items():
        info = getattr(state, "info", None)
        if not isinstance(info, LayerInfo) or id(info.module) not in owned:
            raise ValueError(f"layer {name}: the result's layer is not a module of this model "
                             "(export the model that compress() compressed)")
        grids = list(state.grids)
        if len(grids) != info.groups:
            raise ValueError(f"layer {name}: the result has {len(grids)} grids for {info.groups} groups")
        if all(g is None for g in grids):
            layers[name] = _Layer(name, info)
            continue
        if any(g is None for g in grids):
            raise ValueError(f"layer {name}: some conv groups are quantized and others not")
        target = _native(info).to(torch.float32)
        g0 = grids[0]
        for g in grids[1:]:
            if (g.bits, g.strategy, g.group_size, tuple(g.scale.shape)) != (g0.bits, g0.strategy, g0.group_size,
                                                                          tuple(g0.scale.shape)):
                raise ValueError(f"layer {name}: its conv groups have different grid settings")
        grids = [g.to("cpu") for g in grids]
        codes = torch.stack([grids[i].encode(target[i]) for i in range(info.groups)])
        col = torch.stack([g.column_groups(info.cols, device="cpu") for g in grids])
        layer = _Layer(name, info, codes, torch.stack([g.scale for g in grids]).to(torch.float32),
                       torch.stack([g.zero for g in grids]).to(torch.float32), g0.bits, g0.group_size, g0.strategy)
        _check_columns(layer, col)
        layers[name] = layer
    quantizers = dict(getattr(result, "activation_quantizers", None) or {})
    return layers, quantizers


def _layers_from_artifact(model: nn.Module, directory) -> Tuple[Dict[str, _Layer], Dict[str, ActivationQuantizer]]:
    directory = Path(directory)
    config = read_config(directory)
    tensors = _read_weights(directory, config)
    found = find_layers(model)
    layers = {}
    for name, e in config["layers"].items():
        info = found.get(name)
        if info is None:
            raise ValueError(f"layer {name}: the artifact's layer is not a compressible layer of this model")
        if (info.groups, info.rows, info.cols) != (e.get("groups"), e.get("rows"), e.get("cols")):
            theirs = (e.get("groups"), e.get("rows"), e.get("cols"))
            raise ValueError(f"layer {name}: the artifact's layer has (groups, rows, cols) {theirs}, "
                             f"the model's {(info.groups, info.rows, info.cols)}")
        W = _rebuild_layer(name, e, tensors)
        if not torch.equal(W, _native(info).to(W.dtype)):
            raise ValueError(f"layer {name}: the model's weights are not the artifact's; load the artifact into the "
                             "model first (obcompress.formats.load(directory, model))")
        if e["storage"] not in (CODES, MASK_CODES):
            layers[name] = _Layer(name, info)
            continue
        G, R, C = info.groups, info.rows, info.cols
        q = e["quantization"]
        bits = int(q["bits"])
        mask = None
        if e["storage"] == MASK_CODES:
            mask = unpack_mask(tensors[_layer_key(name, "mask")], (G, R, C))
        kept = G * R * C if mask is None else int(mask.sum())
        codes_kept = unpack_bits(_expect(tensors, _layer_key(name, "codes"), (packed_size(kept, bits),), torch.uint8,
                                         f"artifact layer {name!r}"), bits, kept)
        scale = tensors[_layer_key(name, "scale")].to(torch.float32)
        zero = tensors[_layer_key(name, "zero")].to(torch.float32).expand(scale.shape)
        g_idx = tensors.get(_layer_key(name, "g_idx"))
        col = _column_groups(G, C, q["strategy"], q["group_size"], g_idx)
        if mask is None:
            codes = codes_kept.reshape(G, R, C)
        else:
            # A pruned weight has no stored code; its zero point is the code that decodes to 0.
            idx = col.to(torch.long)[:, None, :].expand(G, R, C)
            codes = torch.gather(zero.expand(G, R, scale.shape[-1]), 2, idx).round().clamp(0, 2**bits - 1)
            codes = codes.to(torch.uint8)
            codes[mask] = codes_kept
        layer = _Layer(name, info, codes, scale, zero.contiguous(), bits, q["group_size"], q["strategy"])
        _check_columns(layer, col)
        layers[name] = layer
    quantizers = quantizers_from_dict(config.get("activation_quantizers", {}) or {})
    for name in quantizers:
        if name not in found:
            raise ValueError(f"layer {name}: the artifact has an activation quantizer for it, but the model has no "
                             "such compressible layer")
    return layers, quantizers


def _copies(protos) -> list:
    """Detached copies of protobuf messages, to outlive the repeated field they came from."""
    out = []
    for p in protos:
        c = type(p)()
        c.CopyFrom(p)
        out.append(c)
    return out


def _replace(field, items) -> None:
    del field[:]
    field.extend(items)


def _check_columns(layer: _Layer, col: torch.Tensor) -> None:
    """The grid's column groups must be runs of consecutive columns, which is all DequantizeLinear has."""
    C = layer.info.cols
    c = torch.arange(C)
    expected = (c // layer.group_size) if layer.strategy == "group" else torch.zeros_like(c)
    if not torch.equal(col.to(torch.long).reshape(-1, C), expected.expand(col.reshape(-1, C).shape[0], C)):
        raise ValueError(f"layer {layer.name}: its quantization groups are not runs of consecutive columns "
                         "(GPTQ act-order groups); DequantizeLinear cannot express them: quantize without act_order "
                         "or with strategy 'channel'")


def _check_on_grid(layer: _Layer, opset: int) -> None:
    info = layer.info
    target = _native(info)
    if target.dtype != torch.float32:
        raise ValueError(f"layer {layer.name}: weight dtype {target.dtype}; the ONNX export handles float32 models")
    if layer.codes is None:
        return
    if layer.scale.shape[-1] > 1 and opset < BLOCKED_OPSET:
        raise ValueError(f"layer {layer.name}: its grid has {layer.scale.shape[-1]} groups of {layer.group_size} columns "
                         f"per row, which needs blocked DequantizeLinear (opset >= {BLOCKED_OPSET}, asked {opset})")
    if not torch.equal(torch.round(layer.zero), layer.zero):
        raise ValueError(f"layer {layer.name}: its zero points are not integers, which ONNX zero points must be")
    G, C = info.groups, info.cols
    col = _column_groups(G, C, layer.strategy, layer.group_size, None)
    if not torch.equal(_decode(layer.codes, layer.scale, layer.zero, col, None, torch.float32), target):
        raise ValueError(f"layer {layer.name}: its weights are not on the grid recorded for it "
                         "(was the model changed after compress() or load()?)")


# ---------------------------------------------------------------------------------------------
# torch export


@contextlib.contextmanager
def _activation_hooks_suspended(model: nn.Module):
    """Take obcompress's input fake-quantizers out of the forward for the trace: the graph gets
    Q/DQ nodes instead of their round/clamp arithmetic. ``formats.load`` installs them without a
    handle, so they are found by the module that defines them and put back exactly as they were."""
    saved = []
    for m in model.modules():
        hooks = m._forward_pre_hooks
        ours = [k for k, h in hooks.items() if getattr(h, "__module__", None) == _activations.__name__]
        if ours:
            saved.append((m, dict(hooks), dict(m._forward_pre_hooks_with_kwargs)))
            for k in ours:
                del hooks[k]
                m._forward_pre_hooks_with_kwargs.pop(k, None)
    try:
        yield
    finally:
        for m, hooks, with_kwargs in saved:
            m._forward_pre_hooks.clear()
            m._forward_pre_hooks.update(hooks)
            m._forward_pre_hooks_with_kwargs.clear()
            m._forward_pre_hooks_with_kwargs.update(with_kwargs)


def _torch_export(model: nn.Module, args: tuple, kwargs: dict, opset: int, dynamic_batch: bool):
    from torch.export import Dim

    dynamic = None
    if dynamic_batch:
        # AUTO, not DYNAMIC: a batch-1 example specialises to batch 1 instead of failing the trace.
        if kwargs:
            dynamic = {k: {0: Dim.AUTO} for k in kwargs}
        else:
            dynamic = tuple({0: Dim.AUTO} for _ in args)
    was_training = model.training
    model.eval()
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
            warnings.simplefilter("ignore")
            # optimize=False: the exporter's optimiser folds BatchNorm into the conv weight under the
            # weight's own name, and the codes would no longer be that weight's.
            program = torch.onnx.export(model, args, None, kwargs=kwargs or None, dynamo=True, opset_version=opset,
                                        optimize=False, verbose=False, dynamic_shapes=dynamic, external_data=False)
    except ImportError as e:
        raise ValueError(f"the ONNX exporter needs onnx and onnxscript: pip install 'obcompress[onnx]' ({e})") from None
    except Exception as e:  # the exporter's own errors are many types; the message is what matters
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"torch.onnx.export cannot export {type(model).__name__}: {first}") from e
    finally:
        quiet.setLevel(level)
        model.train(was_training)
    return program.model_proto


# ---------------------------------------------------------------------------------------------
# graph rewriting


class _Graph:
    """Name bookkeeping over an onnx GraphProto: initializers, consumers, fresh names."""

    def __init__(self, model_proto):
        self.model = model_proto
        self.graph = model_proto.graph
        self.inits = {t.name: t for t in self.graph.initializer}
        self.names = set(self.inits) | {i.name for i in self.graph.input} | {o.name for o in self.graph.output}
        for n in self.graph.node:
            self.names.update(n.input)
            self.names.update(n.output)
            if n.name:
                self.names.add(n.name)
        # One list of the node objects, held for the whole rewrite: their ids key the edits below.
        self.nodes = list(self.graph.node)
        self._arrays: Dict[str, np.ndarray] = {}
        self.removed: set = set()  # node ids (id of NodeProto) to drop
        self.before: Dict[int, list] = {}  # node id -> nodes to insert before it
        self.front: list = []  # nodes fed by initializers only
        self.new_inits: list = []
        self.drop_inits: set = set()
        # layer name -> names of its weight DequantizeLinear (scale, zero point, output) for the fold pass
        self.weight_dq: Dict[str, Dict[str, Any]] = {}

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self.names:
            i += 1
            name = f"{base}_{i}"
        self.names.add(name)
        return name

    def array(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            from onnx import numpy_helper

            self._arrays[name] = numpy_helper.to_array(self.inits[name])
        return self._arrays[name]

    def consumers(self, value: str) -> List[Tuple[Any, int]]:
        return [(n, i) for n in self.nodes if id(n) not in self.removed for i, x in enumerate(n.input) if x == value]

    def find_weight(self, preferred: str, W: np.ndarray) -> Optional[str]:
        """The initializer holding exactly ``W`` (the name torch gives the parameter first)."""
        if preferred in self.inits and self._equal(preferred, W):
            return preferred
        for name, t in self.inits.items():
            if tuple(t.dims) == W.shape and name not in self.drop_inits and self._equal(name, W):
                return name
        return None

    def _equal(self, name: str, W: np.ndarray) -> bool:
        a = self.array(name)
        return a.dtype == W.dtype and a.shape == W.shape and np.array_equal(a, W)


def _to_int_tensor(q: np.ndarray, kind: str, name: str):
    """Signed codes (or zero points) as the initializer of their kind: int4 as int4; int8 as uint8,
    offset by 128 (codes and zero points alike, so every dequantized value stays the same).

    Why uint8: onnxruntime's integer kernels for uint8 activations and int8 weights (u8s8) sum
    pairs of products in int16 with saturation (VPMADDUBSW) on x86 CPUs with AVX2 but without
    AVX-VNNI, so QLinearConv / QLinearMatMul / MatMulInteger are silently wrong there; uint8
    weights run its u8u8 kernels, which widen both operands to 16 bits first (VPMADDWD): exact
    on every x86 CPU, at the same byte per weight."""
    from onnx import numpy_helper

    if kind == "int4":
        import ml_dtypes

        return numpy_helper.from_array(q.astype(np.int8).astype(ml_dtypes.int4), name)
    return numpy_helper.from_array((q.astype(np.int16) + 128).astype(np.uint8), name)


def _weight_arrays(layer: _Layer, fmt: str, opset: int):
    """The layer's weight as signed codes in the module's layout, with DequantizeLinear's parameters.

    Returns (q (module layout, int), scale, zero, attrs, kind, granularity, reshape_to) where
    reshape_to is the conv weight shape when the codes stay 2-D (group grids of a conv layer).
    """
    info = layer.info
    G, R, C = info.groups, info.rows, info.cols
    O = G * R
    half = 2 ** (layer.bits - 1)
    q2 = layer.codes.reshape(O, C).to(torch.int16) - half
    ng = layer.scale.shape[-1]
    s2 = layer.scale.expand(G, R, ng).reshape(O, ng)
    z2 = (layer.zero.expand(G, R, ng).reshape(O, ng) - half).to(torch.int16)
    kind = "int4" if fmt == "auto" and layer.bits <= 4 and opset >= BLOCKED_OPSET else "int8"
    shape = tuple(info.module.weight.shape)
    hf = info.kind == "conv1d_hf"
    out_axis = 1 if hf else 0
    if ng > 1:
        attrs = {"axis": 0 if hf else 1, "block_size": int(layer.group_size)}
        q, s, z = (q2.t(), s2.t(), z2.t()) if hf else (q2, s2, z2)
        reshape = shape if info.kind in ("conv1d", "conv2d") else None
        return q.numpy(), s.contiguous().numpy(), z.contiguous().numpy(), attrs, kind, "block", reshape
    s1, z1 = s2[:, 0], z2[:, 0]
    q = q2.t() if hf else q2.reshape(shape)
    if bool((s1 == s1[0]).all()) and bool((z1 == z1[0]).all()):
        return q.numpy(), s1[:1].reshape(()).numpy(), z1[:1].reshape(()).numpy(), {}, kind, "tensor", None
    return q.numpy(), s1.contiguous().numpy(), z1.contiguous().numpy(), {"axis": out_axis}, kind, "channel", None


def _dequantized(q: np.ndarray, s: np.ndarray, z: np.ndarray, attrs: Dict[str, int]) -> np.ndarray:
    """DequantizeLinear's result computed here: (q - zero) * scale in float32."""
    axis, block = attrs.get("axis"), attrs.get("block_size")
    if s.ndim == 0:
        ss, zz = s, z
    elif block is None:
        view = [1] * q.ndim
        view[axis] = -1
        ss, zz = s.reshape(view), z.reshape(view)
    else:
        ss = np.repeat(s, block, axis=axis).take(np.arange(q.shape[axis]), axis=axis)
        zz = np.repeat(z, block, axis=axis).take(np.arange(q.shape[axis]), axis=axis)
    return (q.astype(np.int32) - zz.astype(np.int32)).astype(np.float32) * ss.astype(np.float32)


def _add_dequantize(g: _Graph, layer: _Layer, wname: str, perm: Optional[List[int]], out: str, fmt: str,
                    opset: int) -> Dict[str, Any]:
    from onnx import helper, numpy_helper

    q, s, z, attrs, kind, gran, reshape = _weight_arrays(layer, fmt, opset)
    if perm is not None and (reshape is not None or len(perm) != q.ndim):
        raise ValueError(f"layer {layer.name}: the exported graph transposes its {len(perm)}-D weight, which the "
                         "exporter can fold only for a 2-D weight without column groups")
    if perm is not None:
        q = q.transpose(perm)
        if s.ndim == q.ndim:
            s, z = s.transpose(perm), z.transpose(perm)
        if "axis" in attrs:
            attrs = {**attrs, "axis": perm.index(attrs["axis"])}
    deq = _dequantized(q, s, z, attrs)
    if reshape is not None:
        deq = deq.reshape(reshape)
    W = g.array(wname)
    expected = W.transpose(perm) if perm is not None else W
    if deq.shape != expected.shape or not np.array_equal(deq, expected):
        raise ValueError(f"layer {layer.name}: its integer codes do not dequantize to the weight in the exported "
                         "graph")  # a bug, not a user error: refuse rather than write a different model
    qn, sn, zn = g.fresh(f"{wname}_quantized"), g.fresh(f"{wname}_scale"), g.fresh(f"{wname}_zero_point")
    if perm is None:
        g.weight_dq[layer.name] = {"out": out, "scale": sn, "zero": zn, "kind": kind,
                                   "blocked": "block_size" in attrs}
    g.new_inits += [_to_int_tensor(q, kind, qn), numpy_helper.from_array(np.ascontiguousarray(s, np.float32), sn),
                    _to_int_tensor(np.ascontiguousarray(z), kind, zn)]
    if reshape is None:
        g.front.append(helper.make_node("DequantizeLinear", [qn, sn, zn], [out], name=g.fresh(f"{layer.name}/weight_dq"),
                                        **attrs))
    else:
        flat = g.fresh(f"{wname}_dequantized_2d")
        shape_name = g.fresh(f"{wname}_shape")
        g.new_inits.append(numpy_helper.from_array(np.array(reshape, dtype=np.int64), shape_name))
        g.front += [helper.make_node("DequantizeLinear", [qn, sn, zn], [flat], name=g.fresh(f"{layer.name}/weight_dq"),
                                     **attrs),
                    helper.make_node("Reshape", [flat, shape_name], [out], name=g.fresh(f"{layer.name}/weight_reshape"))]
    return {"weight": kind, "bits": layer.bits, "granularity": gran}


def _data_input(node, weight_index: int) -> int:
    if node.op_type in ("Conv", "Gemm"):
        return 0
    return 1 - weight_index  # MatMul: the other operand


def _compute_users(g: _Graph, layer: _Layer, wname: str):
    """(direct users, [(transpose node, perm, its users)]) of the weight that compute with it (shape
    reads are left out, also of a Transpose); ValueError for any other use."""

    def check(node, idx, via):
        op = node.op_type
        if op in _SHAPE_OPS:
            return False
        ok = op in _WEIGHT_OPS and (_WEIGHT_OPS[op] is None or _WEIGHT_OPS[op] == idx)
        if not ok:
            raise ValueError(f"layer {layer.name}: the exported graph uses its weight{via} as input {idx} of a {op} "
                             f"node ({node.name or 'unnamed'}), which the exporter cannot express with quantized weights")
        if op == "Conv" and layer.info.kind not in ("conv1d", "conv2d"):
            raise ValueError(f"layer {layer.name}: its weight feeds a Conv node, but it is a {layer.info.kind} layer")
        return True

    direct, transposed = [], []
    users = g.consumers(wname)
    if not users:
        raise ValueError(f"layer {layer.name}: no node of the exported graph uses its weight (is the layer called "
                         "in the model's forward?)")
    for node, idx in users:
        if node.op_type == "Transpose":
            rank = len(g.inits[wname].dims)
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), list(range(rank))[::-1])
            after = g.consumers(node.output[0])
            if not after:
                raise ValueError(f"layer {layer.name}: a Transpose of its weight is used by no node")
            transposed.append((node, perm, [(n2, i2) for n2, i2 in after if check(n2, i2, " (transposed)")]))
        elif check(node, idx, ""):
            direct.append((node, idx))
    return direct, transposed, len(users) > len(direct) + len(transposed)


def _add_input_quantizer(g: _Graph, layer: _Layer, node, input_index: int, q: ActivationQuantizer) -> None:
    from onnx import helper, numpy_helper

    x = node.input[input_index]
    base = f"{layer.name}/input"
    sn, zn = g.fresh(f"{layer.name}.input_scale"), g.fresh(f"{layer.name}.input_zero_point")
    g.new_inits += [numpy_helper.from_array(np.array(q.scale, dtype=np.float32), sn),
                    numpy_helper.from_array(np.array(q.zero, dtype=np.uint8), zn)]
    nodes = []
    src = x
    if q.bits < 8:
        # uint8 saturates at 255; clipping to the quantizer's own range first gives its clamp at 2^bits - 1.
        lo = np.float32(q.scale) * np.float32(0 - q.zero)
        hi = np.float32(q.scale) * np.float32(q.maxq - q.zero)
        ln, hn, clipped = g.fresh(f"{layer.name}.input_min"), g.fresh(f"{layer.name}.input_max"), g.fresh(f"{base}_clipped")
        g.new_inits += [numpy_helper.from_array(np.array(lo, np.float32), ln),
                        numpy_helper.from_array(np.array(hi, np.float32), hn)]
        nodes.append(helper.make_node("Clip", [src, ln, hn], [clipped], name=g.fresh(f"{base}_clip")))
        src = clipped
    qv, dq = g.fresh(f"{base}_quantized"), g.fresh(f"{base}_dequantized")
    nodes += [helper.make_node("QuantizeLinear", [src, sn, zn], [qv], name=g.fresh(f"{base}_q")),
              helper.make_node("DequantizeLinear", [qv, sn, zn], [dq], name=g.fresh(f"{base}_dq"))]
    g.before.setdefault(id(node), []).extend(nodes)
    node.input[input_index] = dq


def _rewrite(model_proto, layers: Dict[str, _Layer], quantizers: Dict[str, ActivationQuantizer], fmt: str,
             opset: int, activations: bool) -> Tuple[Dict[str, Dict[str, Any]], Dict[str, Dict[str, Any]]]:
    g = _Graph(model_proto)
    report: Dict[str, Dict[str, Any]] = {}
    act_layers = set(quantizers) if activations else set()
    # every layer that the export changes: quantized weights and quantized inputs
    todo = [n for n in layers if layers[n].codes is not None or n in act_layers]
    todo += [n for n in act_layers if n not in layers]
    for name in todo:
        if name not in layers:
            raise ValueError(f"layer {name}: has an activation quantizer but no compression information")
    for name in todo:
        layer = layers[name]
        W = layer.info.module.weight.detach().cpu().numpy()
        wname = g.find_weight(f"{name}.weight", W)
        if wname is None:
            raise ValueError(f"layer {name}: its weight is not in the exported graph as it is in the model (the "
                             "exporter folded it into another constant, or the layer is not called in the forward); "
                             "it cannot be exported with quantized weights")
        direct, transposed, shape_reads = _compute_users(g, layer, wname)
        entry: Dict[str, Any] = {"weight": "float", "bits": None, "granularity": None, "activation_bits": None}
        if layer.codes is not None:
            if direct or shape_reads:
                entry.update(_add_dequantize(g, layer, wname, None, wname, fmt, opset))
            for node, perm, _ in transposed:
                entry.update(_add_dequantize(g, layer, wname, perm, node.output[0], fmt, opset))
                g.removed.add(id(node))
            g.drop_inits.add(wname)
        if name in act_layers:
            q = quantizers[name]
            users = direct + [(n2, i2) for _, _, after in transposed for n2, i2 in after]
            for node, idx in users:
                _add_input_quantizer(g, layer, node, _data_input(node, idx), q)
            entry["activation_bits"] = q.bits
        report[name] = entry
    for name in layers:
        report.setdefault(name, {"weight": "float", "bits": None, "granularity": None, "activation_bits": None})
    nodes = list(g.front)
    for n in g.nodes:
        if id(n) in g.removed:
            continue
        nodes.extend(g.before.get(id(n), []))
        nodes.extend(_copies([n]))  # the originals go with the old node list
    keep = _copies(t for t in g.graph.initializer if t.name not in g.drop_inits)
    _replace(g.graph.node, nodes)
    _replace(g.graph.initializer, keep + g.new_inits)
    return report, g.weight_dq


# ---------------------------------------------------------------------------------------------
# folding for onnxruntime's integer kernels
#
# onnxruntime replaces DequantizeLinear(x) -> Conv(DequantizeLinear(w)) -> QuantizeLinear(y) by its
# integer QLinearConv only when the Conv's output goes to that one QuantizeLinear and nothing else. The
# traced graph has a BatchNormalization after each conv, often a clamp (ReLU6 is a Clip) and, for
# "same" padding, a Pad before the next conv's input quantizer; all three are rewritten away here,
# each exactly (up to float rounding): the next layer's codes are the ones the simulation computes.

_CLAMPS = ("Clip", "Relu")
_CODE_RANGE = {"uint8": (0, 255), "int8": (-128, 127)}


def _constant(g: _Graph, producers: Dict[str, Any], name: str) -> Optional[np.ndarray]:
    """The value of ``name`` when it is an initializer, a Constant or a float cast of one; else None."""
    from onnx import TensorProto, helper, numpy_helper

    if not name:
        return None
    if name in g.inits:
        return g.array(name)
    node = producers.get(name)
    if node is None:
        return None
    if node.op_type == "Constant" and len(node.attribute) == 1:
        a = node.attribute[0]
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name in ("value_float", "value_floats", "value_int", "value_ints"):
            return np.asarray(helper.get_attribute_value(a))
        return None
    to = next((a.i for a in node.attribute if a.name == "to"), None)
    # Only float32 models are exported: the CastLike of a constant casts it to float32 (F.relu6's
    # bounds are integers until then).
    if (node.op_type == "Cast" and to == TensorProto.FLOAT) or node.op_type == "CastLike":
        v = _constant(g, producers, node.input[0])
        return None if v is None or v.dtype.kind not in "fiub" else v.astype(np.float32)
    return None


def _cast_constants(g: _Graph, producers) -> None:
    """CastLike(constant, x) with a float32 x -> Cast(constant, to=FLOAT).

    torch casts a clamp's bounds and a bias-free conv's zero bias "like" the activation; that read of
    the activation only for its dtype would keep a dropped clamp or Pad alive and give the conv's
    output a second reader, which is enough to keep onnxruntime from its integer kernel."""
    from onnx import TensorProto, helper

    types = {v.name: v.type.tensor_type.elem_type for v in list(g.graph.value_info) + list(g.graph.input)}
    types.update({t.name: t.data_type for t in g.graph.initializer})
    for node in g.nodes:
        if node.op_type != "CastLike" or types.get(node.input[1]) != TensorProto.FLOAT:
            continue
        if _constant(g, producers, node.input[0]) is None:
            continue
        del node.input[1]
        node.op_type = "Cast"
        node.attribute.append(helper.make_attribute("to", TensorProto.FLOAT))


def _fold_batchnorm(g: _Graph, producers, outputs: set, layer: _Layer, rec: Dict[str, Any], conv) -> bool:
    """BatchNorm after the conv -> per-channel factor on the weight's scale, shift into the bias."""
    from onnx import helper, numpy_helper

    users = g.consumers(conv.output[0])
    if conv.output[0] in outputs or len(users) != 1:
        return False
    bn, idx = users[0]
    if bn.op_type != "BatchNormalization" or idx != 0 or len(bn.output) != 1:
        return False
    attrs = {a.name: helper.get_attribute_value(a) for a in bn.attribute}
    if attrs.get("training_mode", 0):
        return False
    O = layer.info.groups * layer.info.rows
    params = [_constant(g, producers, n) for n in bn.input[1:5]]
    if any(p is None or p.shape != (O,) for p in params):
        return False
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)
    if len(conv.input) > 2 and conv.input[2]:
        b = _constant(g, producers, conv.input[2])
        if b is None:
            if layer.info.module.bias is not None:
                return False
            # torch's exporter builds the zero bias of a bias-free conv from the weight's shape at run
            # time; the module says it is zero.
            b = np.zeros(O)
        elif b.shape != (O,):
            return False
    else:
        b = np.zeros(O)
    # float32 epsilon: what the BatchNormalization node computes with
    factor = gamma / np.sqrt(var + np.float64(np.float32(attrs.get("epsilon", 1e-5))))
    s = g.array(rec["scale"]).astype(np.float64)
    folded = s * (factor[:, None] if rec["blocked"] else factor)
    if not np.isfinite(folded).all() or (folded == 0).any():
        return False  # a zero scale would make the integer kernels divide by zero
    dq = next(n for n in g.nodes
              if n.op_type == "DequantizeLinear" and len(n.input) > 1 and n.input[1] == rec["scale"])
    if s.ndim == 0:
        # one scale per tensor becomes one per output channel, along the conv weight's axis 0
        z = np.asarray(g.array(rec["zero"]))  # already in its stored type (uint8 for int8 codes)
        g.inits[rec["zero"]].CopyFrom(numpy_helper.from_array(np.full(O, z, z.dtype), rec["zero"]))
        g._arrays.pop(rec["zero"], None)
        dq.attribute.append(helper.make_attribute("axis", 0))
    g.inits[rec["scale"]].CopyFrom(numpy_helper.from_array(folded.astype(np.float32), rec["scale"]))
    g._arrays.pop(rec["scale"], None)
    bias = g.fresh(f"{layer.name}.bias_folded")
    g.new_inits.append(numpy_helper.from_array(((b - mean) * factor + beta).astype(np.float32), bias))
    if len(conv.input) > 2:
        conv.input[2] = bias
    else:
        conv.input.append(bias)
    conv.output[0] = bn.output[0]
    producers[bn.output[0]] = conv
    g.removed.add(id(bn))
    return True


def _fold_pad(g: _Graph, producers, layer: _Layer, conv) -> bool:
    """A zero Pad before the conv's input (and its quantizer) -> the conv's own pads.

    Exact: the quantizer maps 0 to its zero point, which dequantizes to 0 again, so padding before or
    after quantizing is the same, and QLinearConv pads with the zero point."""
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return False
    first, node = conv, producers.get(conv.input[0])
    if node is not None and node.op_type == "DequantizeLinear":
        q = producers.get(node.input[0])
        if q is None or q.op_type != "QuantizeLinear" or list(q.input[1:]) != list(node.input[1:]):
            return False
        # the unpadded input goes through the quantizer only if nothing else reads its codes or values
        if len(g.consumers(node.input[0])) != 1 or len(g.consumers(conv.input[0])) != 1:
            return False
        first, node = q, producers.get(q.input[0])
        if node is not None and node.op_type == "Clip":  # the clamp of a quantizer of fewer than 8 bits
            lo, hi = (_constant(g, producers, n) for n in node.input[1:3])
            if lo is None or hi is None or not float(lo) <= 0.0 <= float(hi):
                return False
            if len(g.consumers(node.output[0])) != 1:
                return False
            first, node = node, producers.get(node.input[0])
    if node is None or node.op_type != "Pad":
        return False
    mode = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "mode"), b"constant")
    if mode not in (b"constant", "constant") or (len(node.input) > 3 and node.input[3]):
        return False
    value = _constant(g, producers, node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(())
    pads = _constant(g, producers, node.input[1])
    rank = {"conv1d": 3, "conv2d": 4}[layer.info.kind]
    if value is None or value.size != 1 or float(value) != 0.0 or pads is None or pads.shape != (2 * rank,):
        return False
    pads = [int(p) for p in pads]
    if min(pads) < 0 or pads[0] or pads[1] or pads[rank] or pads[rank + 1]:
        return False  # a crop, or padding of batch or channels, is no conv padding
    spatial = rank - 2
    old = list(attrs.get("pads", [0] * 2 * spatial))
    new = [old[d] + pads[2 + d] for d in range(spatial)]
    new += [old[spatial + d] + pads[rank + 2 + d] for d in range(spatial)]
    for a in [a for a in conv.attribute if a.name in ("pads", "auto_pad")]:
        conv.attribute.remove(a)
    conv.attribute.append(helper.make_attribute("pads", new))
    # the Pad itself stays only if something else reads it
    first.input[0] = node.input[0]
    return True


def _quantize_output(g: _Graph, producers, outputs: set, layer: _Layer, conv, after: Dict[int, list]) -> List[str]:
    """Make the conv's output go to exactly one QuantizeLinear, when what follows it is a chain of
    clamps (Clip, Relu) ending at input quantizers that share one scale and zero point.

    A chain that cannot move a value out of the quantizer's code range is dropped. Otherwise a
    Quantize/DequantizeLinear pair with that quantizer's parameters goes between the conv and the chain:
    quantizing, clamping to [lo, hi] and quantizing again gives the codes of quantizing the clamped
    value, because rounding to the grid is monotone and a bound beyond the last code clamps to it."""
    from onnx import helper

    value, chain, lo, hi = conv.output[0], [], -np.inf, np.inf
    while True:
        users = g.consumers(value)
        if value in outputs or not users:
            return []
        if all(u.op_type == "QuantizeLinear" and i == 0 for u, i in users):
            break
        if len(users) != 1 or users[0][0].op_type not in _CLAMPS or users[0][1] != 0:
            return []
        node = users[0][0]
        if node.op_type == "Relu":
            a, b = 0.0, np.inf
        else:
            ends = []
            for i, default in ((1, -np.inf), (2, np.inf)):
                if len(node.input) > i and node.input[i]:
                    v = _constant(g, producers, node.input[i])
                    if v is None or v.size != 1:
                        return []
                    ends.append(float(v))
                else:
                    ends.append(default)
            a, b = ends
        # clamp(clamp(x, lo, hi), a, b) == clamp(x, clamp(lo, a, b), clamp(hi, a, b))
        lo, hi = min(max(lo, a), b), min(max(hi, a), b)
        chain.append(node)
        value = node.output[0]
    qs = [u for u, _ in users]
    params = set()
    for q in qs:
        s = _constant(g, producers, q.input[1])
        z = _constant(g, producers, q.input[2]) if len(q.input) > 2 and q.input[2] else np.zeros((), np.uint8)
        if s is None or z is None or s.size != 1 or z.size != 1 or str(z.dtype) not in _CODE_RANGE:
            return []
        params.add((float(s), int(z), str(z.dtype), q.input[1], q.input[2] if len(q.input) > 2 else ""))
    if len({p[:3] for p in params}) != 1:
        return []
    if not chain:
        return []  # nothing in between: complete already, or several quantizers that no pair can serve
    s, z, dtype, sn, zn = sorted(params)[0]
    qmin, qmax = _CODE_RANGE[dtype]

    def code(v: float) -> float:
        return v if math.isinf(v) else float(np.round(np.float32(v) / np.float32(s))) + z

    if code(lo) <= qmin and code(hi) >= qmax:
        # the quantizer's own clamp to its codes does what the chain does
        for q in qs:
            q.input[0] = conv.output[0]
        return [n.op_type for n in chain]
    y, yq = g.fresh(f"{layer.name}/output"), g.fresh(f"{layer.name}/output_quantized")
    out = conv.output[0]
    conv.output[0] = y
    producers[y] = conv
    qn = helper.make_node("QuantizeLinear", [y, sn, zn] if zn else [y, sn], [yq],
                          name=g.fresh(f"{layer.name}/output_q"))
    dqn = helper.make_node("DequantizeLinear", [yq, sn, zn] if zn else [yq, sn], [out],
                           name=g.fresh(f"{layer.name}/output_dq"))
    after.setdefault(id(conv), []).extend([qn, dqn])
    producers[yq], producers[out] = qn, dqn
    return ["QuantizeLinear"]


def _drop_dead(g: _Graph, outputs: set, after: Dict[int, list]) -> None:
    """Remove nodes whose outputs nothing reads (ONNX nodes have no side effects)."""
    while True:
        live = [n for n in g.nodes if id(n) not in g.removed]
        read = {x for n in live for x in n.input} | outputs
        read.update(x for ns in after.values() for n in ns for x in n.input)
        dead = [n for n in live if not any(o in read for o in n.output if o)]
        if not dead:
            return
        g.removed.update(id(n) for n in dead)


def _fold_for_integer_kernels(model_proto, layers: Dict[str, _Layer], weight_dq: Dict[str, Dict[str, Any]]):
    """The exact rewrites above, for every conv with a quantized weight; returns (what was folded or
    inserted per layer, the layers whose Conv now reads dequantized input and weight and feeds one
    QuantizeLinear: the pattern onnxruntime runs as QLinearConv)."""
    g = _Graph(model_proto)
    outputs = {o.name for o in g.graph.output}
    producers = {o: n for n in g.nodes for o in n.output}
    after: Dict[int, list] = {}
    folded: Dict[str, List[str]] = {}
    convs = {}
    _cast_constants(g, producers)
    for name, rec in weight_dq.items():
        layer = layers[name]
        if layer.info.kind not in ("conv1d", "conv2d"):
            continue
        users = [(n, i) for n, i in g.consumers(rec["out"]) if n.op_type not in _SHAPE_OPS]
        if len(users) != 1 or users[0][0].op_type != "Conv" or users[0][1] != 1:
            continue  # a weight shared by several convs has one scale for all: nothing to fold into
        convs[name] = users[0][0]
        # onnxruntime (1.32) has integer convs for int8 weights only, but its default sessions round the
        # bias of every conv with dequantized input and weight to int32 steps of input scale x weight
        # scale: for an int4 weight (a coarse scale) a folded shift would only lose precision there.
        fold = rec["kind"] == "int8" and _fold_batchnorm(g, producers, outputs, layer, rec, convs[name])
        folded[name] = ["BatchNormalization"] if fold else []
    _drop_dead(g, outputs, after)
    for name, conv in convs.items():
        if _fold_pad(g, producers, layers[name], conv):
            folded[name].append("Pad")
    _drop_dead(g, outputs, after)
    for name, conv in convs.items():
        folded[name] += _quantize_output(g, producers, outputs, layers[name], conv, after)
    _drop_dead(g, outputs, after)

    nodes, copies = [], {}
    for n in g.nodes:
        if id(n) in g.removed:
            continue
        copies[id(n)], = _copies([n])  # the originals go with the old node list
        nodes.append(copies[id(n)])
        nodes.extend(after.get(id(n), []))
    made = {o: n for n in nodes for o in n.output}
    readers: Dict[str, list] = {}
    for n in nodes:
        for x in n.input:
            readers.setdefault(x, []).append(n)
    ready = []
    for name, conv in convs.items():
        if weight_dq[name]["kind"] != "int8" or weight_dq[name]["blocked"]:
            continue  # not a weight QLinearConv takes
        c = copies[id(conv)]
        data, weight = made.get(c.input[0]), made.get(c.input[1])
        out = readers.get(c.output[0], [])
        if data is not None and weight is not None and data.op_type == weight.op_type == "DequantizeLinear" \
                and len(out) == 1 and out[0].op_type == "QuantizeLinear" and c.output[0] not in outputs:
            ready.append(name)
    inits = _copies(t for t in list(g.graph.initializer) + g.new_inits if t.name in readers or t.name in outputs)
    # Shapes of values that the rewrite removed would describe nothing.
    infos = _copies(v for v in g.graph.value_info if v.name in made)
    _replace(g.graph.node, nodes)
    _replace(g.graph.initializer, inits)
    _replace(g.graph.value_info, infos)
    return {k: v for k, v in folded.items() if v}, ready


# ---------------------------------------------------------------------------------------------
# public


def _finish(model_proto, path: Path, opset: int, layers_report, folded=None, ready=None) -> OnnxExport:
    import onnx

    model_proto.producer_name = "obcompress"
    meta = model_proto.metadata_props.add()
    meta.key, meta.value = "obcompress.layers", json.dumps(layers_report, sort_keys=True)
    data = model_proto.SerializeToString()
    if len(data) >= 2**31:
        raise ValueError(f"the ONNX model is {len(data):,d} bytes; a single .onnx file holds less than 2 GiB")
    try:
        onnx.checker.check_model(model_proto)
    except onnx.checker.ValidationError as e:
        raise ValueError(f"the rewritten ONNX graph does not pass onnx.checker: {str(e).splitlines()[0]}") from None
    write_bytes(path, data)
    dims = model_proto.graph.input[0].type.tensor_type.shape.dim if model_proto.graph.input else []
    dynamic = bool(dims) and dims[0].HasField("dim_param")
    return OnnxExport(path=path, bytes=path.stat().st_size, opset=opset, dynamic_batch=dynamic, layers=layers_report,
                      folded=folded or {}, integer_ready=ready or [])


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: Union[str, os.PathLike],
    *,
    result=None,
    artifact_dir: Union[None, str, os.PathLike] = None,
    opset: int = DEFAULT_OPSET,
    weight_format: str = "auto",
    activations: bool = True,
    dynamic_batch: bool = True,
    fold_batchnorm: Optional[bool] = None,
) -> OnnxExport:
    """Write the compressed ``model`` as ONNX to ``path`` (atomically); returns what was written.

    Give the compression as ``result`` (what ``compress`` returned for this very model) or as
    ``artifact_dir`` (an artifact that ``formats.load`` has loaded into ``model``). ``example_inputs``
    is a tensor, a tuple of tensors or a dict of keyword tensors the model is traced with;
    ``dynamic_batch`` leaves their first dimension free (a batch of 1 fixes it to 1).
    ``weight_format``: "int8" stores every quantized weight as int8; "auto" stores grids of at most
    4 bits as int4 when ``opset`` >= 21, the rest as int8. ``activations=False`` leaves out the input
    quantizers of a W+A model (the graph then computes with float inputs).

    ``fold_batchnorm`` (default: on when the graph quantizes activations) rewrites each conv with a
    quantized weight so that onnxruntime can run it with integer kernels (QLinearConv, int8 weights
    per tensor or channel), each rewrite exact up to float rounding:

    - a BatchNormalization right after a conv with int8 weights is folded into it: its per-channel factor
      gamma / sqrt(var + eps) multiplies the weight's DequantizeLinear scale (the integer codes stay
      the compressed ones), its shift goes into the conv's bias;
    - a zero Pad in front of the conv's input quantizer becomes the conv's own padding;
    - clamps between the conv and the next layers' input quantizers (Clip, Relu; ReLU6 is a Clip):
      dropped when they cannot move a value out of the quantizer's codes (an asymmetric quantizer
      on ReLU6 outputs, zero point 0 and top code at or below 6), otherwise a Quantize/
      DequantizeLinear pair with that quantizer's scale and zero point goes on the conv's output
      (a symmetric quantizer after ReLU: the clamp at 0 stays, on dequantized codes).

    What stays float: a conv whose output also feeds something else than one quantizer (a residual
    Add, a second branch), or reaches it through anything but clamps (pooling, reshapes). See
    ``OnnxExport.folded`` and ``OnnxExport.integer_ready``; ``ort_optimized_ops`` counts what
    onnxruntime made of it.
    """
    _require_onnx()
    path, opset = _check_common(model, path, opset)
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"weight_format must be one of {WEIGHT_FORMATS}, got {weight_format!r}")
    if not isinstance(activations, bool):
        raise ValueError(f"activations must be true or false, got {activations!r}")
    if fold_batchnorm is not None and not isinstance(fold_batchnorm, bool):
        raise ValueError(f"fold_batchnorm must be true, false or None (on for W+A exports), got {fold_batchnorm!r}")
    if (result is None) == (artifact_dir is None):
        raise ValueError("give exactly one of result= (what compress() returned) or artifact_dir= (an artifact "
                         "loaded into the model); for a float model use export_dense_onnx")
    args, kwargs = _split_inputs(example_inputs)
    if result is not None:
        layers, quantizers = _layers_from_result(model, result)
    else:
        layers, quantizers = _layers_from_artifact(model, artifact_dir)
    for layer in layers.values():
        _check_on_grid(layer, opset)
    with _activation_hooks_suspended(model):
        proto = _torch_export(model, args, kwargs, opset, dynamic_batch)
    report, weight_dq = _rewrite(proto, layers, quantizers, weight_format, opset, activations)
    if fold_batchnorm is None:
        fold_batchnorm = activations and bool(quantizers)
    folded, ready = _fold_for_integer_kernels(proto, layers, weight_dq) if fold_batchnorm else ({}, [])
    return _finish(proto, path, opset, report, folded, ready)


def export_dense_onnx(model: nn.Module, example_inputs: Any, path: Union[str, os.PathLike], *,
                      opset: int = DEFAULT_OPSET, dynamic_batch: bool = True) -> OnnxExport:
    """The model as it computes now, every weight float32 (the baseline next to ``export_onnx``)."""
    _require_onnx()
    path, opset = _check_common(model, path, opset)
    args, kwargs = _split_inputs(example_inputs)
    with _activation_hooks_suspended(model):
        proto = _torch_export(model, args, kwargs, opset, dynamic_batch)
    return _finish(proto, path, opset, {})


def ort_session(path: Union[str, os.PathLike], threads: int = 1, exact: bool = True, fold_weights: bool = False):
    """An onnxruntime CPU session with ``threads`` intra-op threads.

    ``exact=True`` keeps onnxruntime to the model's arithmetic, so that outputs match the PyTorch
    model to float32 rounding: its MatMulNBits (substituted for DequantizeLinear -> MatMul) computes
    in float32 (accuracy level 1) instead of quantizing activations to int8 (its default, level 4),
    and its WeightBiasQuantization pass, which rounds the float bias of a Conv/Gemm with quantized
    input and weight to int32 steps of input scale x weight scale (up to half a step per output),
    is off. ``exact=False`` is onnxruntime's default behaviour, the fastest; only it runs the convs
    that ``export_onnx(fold_batchnorm=True)`` prepares with integer kernels (QLinearConv), whose
    codes may then differ from the simulation's by one step where a value sits on a rounding boundary.

    ``fold_weights``: onnxruntime dequantizes every weight once when the session starts and runs
    float kernels (its QDQ handling off: no integer kernels, Q/DQ of activations computed as they
    stand). Otherwise a weight-only model dequantizes its weights in every run.
    """
    import onnxruntime as ort

    options, kwargs = _session_options(path, threads, exact, fold_weights)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"], **kwargs)


def _session_options(path, threads, exact, fold_weights):
    import onnxruntime as ort

    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    if not Path(path).is_file():
        raise ValueError(f"ONNX file not found: {path}")
    if not isinstance(exact, bool):
        raise ValueError(f"exact must be true or false, got {exact!r}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if not isinstance(fold_weights, bool):
        raise ValueError(f"fold_weights must be true or false, got {fold_weights!r}")
    kwargs = {}
    if fold_weights:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    if exact:
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
        kwargs["disabled_optimizers"] = ["WeightBiasQuantization"]
    return options, kwargs


def ort_optimized_ops(path: Union[str, os.PathLike], threads: int = 1, exact: bool = False,
                      fold_weights: bool = False) -> Dict[str, int]:
    """How many nodes of each op type onnxruntime runs for the model, after its graph optimisation
    (the session ``ort_session`` makes with these arguments; by default onnxruntime's own defaults).

    ``QLinearConv`` counts the convs it runs with integer kernels (``exact=True`` sessions have none:
    QLinearConv needs the int32 bias that the WeightBiasQuantization pass makes)."""
    import collections

    import onnx
    import onnxruntime as ort

    options, kwargs = _session_options(path, threads, exact, fold_weights)
    with tempfile.TemporaryDirectory(prefix="obcompress-ort-") as tmp:
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"], **kwargs)
        graph = onnx.load(options.optimized_model_filepath, load_external_data=False).graph
    return dict(collections.Counter(n.op_type for n in graph.node))


# ---------------------------------------------------------------------------------------------
# per-layer latency in onnxruntime


def _layer_graph(geom, variant, activation_bits: Optional[int], weight_format: str, batch: int):
    """One layer as ``export_onnx`` writes it (random weights, the variant's zeros), and its feed."""
    from onnx import TensorProto, helper, numpy_helper

    from ..search.costs import _kernel_shape, _spatial, kept_weights

    rng = np.random.default_rng(0)
    G, R, C, taps = geom.groups, geom.rows, geom.cols, geom.taps
    O = G * R
    W = rng.standard_normal((O, C)).astype(np.float32)
    if variant.pruned:
        # onnxruntime's CPU kernels have no sparse path: where the zeros are does not matter to them.
        W.reshape(-1)[rng.permutation(W.size)[: W.size - kept_weights(geom, variant)]] = 0.0
    linear = geom.kind in ("linear", "conv1d_hf")
    spatial = _spatial(geom)
    if linear:
        shape_w = (C, O)  # MatMul(x, W^T), as the exporter feeds a linear layer
        W = W.T.copy()
        x = rng.standard_normal((batch * spatial[0], C)).astype(np.float32)
        out_axis = 1
    else:
        ks = _kernel_shape(geom)
        shape_w = (O, C // taps, *ks)
        W = W.reshape(shape_w)
        x = rng.standard_normal((batch, G * (C // taps), *spatial)).astype(np.float32)
        out_axis = 0
    inits, nodes = [], []
    wname = "weight"
    if variant.bits is None:
        inits.append(numpy_helper.from_array(W, wname))
    else:
        half = 2 ** (variant.bits - 1)
        amax = np.abs(W).max(axis=tuple(i for i in range(W.ndim) if i != out_axis))
        scale = np.maximum(amax, 1e-8).astype(np.float32) / (half - 0.5)
        view = [1] * W.ndim
        view[out_axis] = -1
        q = np.clip(np.round(W / scale.reshape(view)), -half, half - 1)
        kind = "int4" if weight_format == "auto" and variant.bits <= 4 else "int8"
        inits += [_to_int_tensor(q, kind, "weight_quantized"), numpy_helper.from_array(scale, "weight_scale"),
                  _to_int_tensor(np.zeros(scale.shape, np.int8), kind, "weight_zero_point")]
        nodes.append(helper.make_node("DequantizeLinear", ["weight_quantized", "weight_scale", "weight_zero_point"],
                                      [wname], axis=out_axis))
    quantize_io = activation_bits is not None and variant.bits is not None
    src = "x"
    if quantize_io:
        inits += [numpy_helper.from_array(np.array(6.0 / 255, np.float32), "act_scale"),
                  numpy_helper.from_array(np.array(128, np.uint8), "act_zero")]
        if activation_bits < 8:
            inits += [numpy_helper.from_array(np.array(-128 * 6.0 / 255, np.float32), "act_min"),
                      numpy_helper.from_array(np.array((2**activation_bits - 129) * 6.0 / 255, np.float32), "act_max")]
            nodes.append(helper.make_node("Clip", ["x", "act_min", "act_max"], ["x_clipped"]))
            src = "x_clipped"
        nodes += [helper.make_node("QuantizeLinear", [src, "act_scale", "act_zero"], ["x_q"]),
                  helper.make_node("DequantizeLinear", ["x_q", "act_scale", "act_zero"], ["x_dq"])]
        src = "x_dq"
    out = "y_float" if quantize_io else "y"
    if linear:
        nodes.append(helper.make_node("MatMul", [src, wname], [out]))
    else:
        pads = [(k - 1) // 2 for k in ks] + [k // 2 for k in ks]
        nodes.append(helper.make_node("Conv", [src, wname], [out], group=G, pads=pads))
    if quantize_io:
        # The next layer's input quantizer right after this one: the pattern onnxruntime's integer
        # kernels (QLinearConv, QLinearMatMul) are chosen for.
        nodes += [helper.make_node("QuantizeLinear", [out, "act_scale", "act_zero"], ["y_q"]),
                  helper.make_node("DequantizeLinear", ["y_q", "act_scale", "act_zero"], ["y"])]
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", DEFAULT_OPSET)])
    return model, {"x": x}


def onnx_layer_latency(geom, variant, *, activation_bits: Optional[int] = None, batch: int = 1, threads: int = 1,
                       repeats: int = 15, warmup: int = 3, weight_format: str = "auto", exact: bool = False) -> float:
    """Median seconds of one forward of a layer variant in onnxruntime, as ``export_onnx`` writes it.

    ``geom`` (search.space.LayerGeometry) gives the layer and its input: a linear layer gets
    round(positions) tokens per sample, a conv stride 1, "same" padding and the square (or 1-D)
    spatial size nearest to ``positions``, as ``LatencyCost`` builds them. A quantized ``variant``
    stores its weight as int8 (int4 for <= 4 bits with ``weight_format="auto"``) behind
    DequantizeLinear; with ``activation_bits`` its input and output pass Quantize/DequantizeLinear
    (the output one stands for the next layer's input quantizer). Weights are random; pruned
    weights are zeros, which onnxruntime's CPU kernels do not skip. Sessions are onnxruntime's
    defaults (``exact=False``), timed like ``LatencyCost``: each sample loops the run over about a
    millisecond, the median of ``repeats`` samples after ``warmup`` runs.
    """
    import statistics
    import time

    from ..search.costs import _check_pair

    geom, variant = _check_pair(geom, variant)
    for key, value, lo in (("batch", batch, 1), ("threads", threads, 1), ("repeats", repeats, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise ValueError(f"layer {geom.name!r}: {key} must be an integer >= {lo}, got {value!r}")
    if activation_bits is not None and (isinstance(activation_bits, bool) or not isinstance(activation_bits, int)
                                        or not 2 <= activation_bits <= 8):
        raise ValueError(f"layer {geom.name!r}: activation_bits must be an integer in 2..8 or None, "
                         f"got {activation_bits!r}")
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"weight_format must be one of {WEIGHT_FORMATS}, got {weight_format!r}")
    model, feeds = _layer_graph(geom, variant, activation_bits, weight_format, batch)
    with tempfile.TemporaryDirectory(prefix="obcompress-layer-") as tmp:
        path = Path(tmp) / "layer.onnx"
        path.write_bytes(model.SerializeToString())
        sess = ort_session(path, threads=threads, exact=exact)
    for _ in range(warmup):
        sess.run(None, feeds)
    t0 = time.perf_counter()
    sess.run(None, feeds)
    number = max(1, min(1000, math.ceil(1e-3 / max(time.perf_counter() - t0, 1e-9))))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(number):
            sess.run(None, feeds)
        samples.append((time.perf_counter() - t0) / number)
    return statistics.median(samples)
