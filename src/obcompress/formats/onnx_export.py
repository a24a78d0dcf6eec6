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
  without VNNI (see ``onnx_graph.to_int_tensor``). Granularity follows the grid:
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

The graph rewriting is ``onnx_graph``, the folds for integer kernels ``onnx_fold``, and running the
result in onnxruntime (sessions, the ops it chose, per-layer latency) ``onnx_runtime``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from ..checks import check_bool, check_int
from ..files import write_bytes
from ..model import activations as _activations
from ..model.activations import ActivationQuantizer, quantizers_from_dict
from ..model.layers import LayerInfo, find_layers, weight_groups
from .artifact import column_groups, decode_codes, read_config, read_layers
from .onnx_fold import fold_for_integer_kernels
from .onnx_graph import BLOCKED_OPSET, DEFAULT_OPSET, WEIGHT_FORMATS, LayerCodes, rewrite

__all__ = ["DEFAULT_OPSET", "OnnxExport", "WEIGHT_FORMATS", "export_dense_onnx", "export_onnx"]

MIN_OPSET = 18  # the oldest opset torch's exporter writes


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
    opset = check_int(opset, f"opset (of the installed onnx's {MIN_OPSET}..{newest})", MIN_OPSET, newest)
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
    return weight_groups(info, dtype=None).cpu()


def _layers_from_result(model: nn.Module, result) -> Tuple[Dict[str, LayerCodes], Dict[str, ActivationQuantizer]]:
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
            layers[name] = LayerCodes(name, info)
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
        layer = LayerCodes(name, info, codes, torch.stack([g.scale for g in grids]).to(torch.float32),
                       torch.stack([g.zero for g in grids]).to(torch.float32), g0.bits, g0.group_size, g0.strategy)
        _check_columns(layer, col)
        layers[name] = layer
    quantizers = dict(getattr(result, "activation_quantizers", None) or {})
    return layers, quantizers


def _layers_from_artifact(model: nn.Module, directory) -> Tuple[Dict[str, LayerCodes], Dict[str, ActivationQuantizer]]:
    config = read_config(directory)
    stored = read_layers(directory)
    found = find_layers(model)
    layers = {}
    for name, s in stored.items():
        e = s.entry
        info = found.get(name)
        if info is None:
            raise ValueError(f"layer {name}: the artifact's layer is not a compressible layer of this model")
        if (info.groups, info.rows, info.cols) != (e.get("groups"), e.get("rows"), e.get("cols")):
            theirs = (e.get("groups"), e.get("rows"), e.get("cols"))
            raise ValueError(f"layer {name}: the artifact's layer has (groups, rows, cols) {theirs}, "
                             f"the model's {(info.groups, info.rows, info.cols)}")
        if not torch.equal(s.weight, _native(info).to(s.weight.dtype)):
            raise ValueError(f"layer {name}: the model's weights are not the artifact's; load the artifact into the "
                             "model first (obcompress.formats.load(directory, model))")
        if s.codes is None:
            layers[name] = LayerCodes(name, info)
            continue
        q = e["quantization"]
        layer = LayerCodes(name, info, s.codes, s.scale, s.zero, int(q["bits"]), q["group_size"], q["strategy"])
        _check_columns(layer, s.column_groups)
        layers[name] = layer
    quantizers = quantizers_from_dict(config.get("activation_quantizers", {}) or {})
    for name in quantizers:
        if name not in found:
            raise ValueError(f"layer {name}: the artifact has an activation quantizer for it, but the model has no "
                             "such compressible layer")
    return layers, quantizers


def _check_columns(layer: LayerCodes, col: torch.Tensor) -> None:
    """The grid's column groups must be runs of consecutive columns, which is all DequantizeLinear has."""
    C = layer.info.cols
    c = torch.arange(C)
    expected = (c // layer.group_size) if layer.strategy == "group" else torch.zeros_like(c)
    if not torch.equal(col.to(torch.long).reshape(-1, C), expected.expand(col.reshape(-1, C).shape[0], C)):
        raise ValueError(f"layer {layer.name}: its quantization groups are not runs of consecutive columns "
                         "(GPTQ act-order groups); DequantizeLinear cannot express them: quantize without act_order "
                         "or with strategy 'channel'")


def _check_on_grid(layer: LayerCodes, opset: int) -> None:
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
    col = column_groups(G, C, layer.strategy, layer.group_size, None)
    if not torch.equal(decode_codes(layer.codes, layer.scale, layer.zero, col, None, torch.float32), target):
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
    check_bool(activations, "activations")
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
    report, weight_dq = rewrite(proto, layers, quantizers, weight_format, opset, activations)
    if fold_batchnorm is None:
        fold_batchnorm = activations and bool(quantizers)
    folded, ready = fold_for_integer_kernels(proto, layers, weight_dq) if fold_batchnorm else ({}, [])
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
