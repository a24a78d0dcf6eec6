"""Rewriting a traced model's ONNX graph for its compressed layers (used by ``onnx_export``).

Each quantized weight's float initializer gives way to its integer codes, a scale and a zero point
behind a ``DequantizeLinear`` (a ``Transpose`` of the weight is folded into the codes); each
quantized input gets ``QuantizeLinear`` -> ``DequantizeLinear`` with its calibrated parameters.
Every integer initializer is decoded here with ONNX's rule, ``(q - zero) * scale`` in float32, and
must equal the weight in the traced graph bit for bit, or the export is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..model.activations import ActivationQuantizer
from ..model.layers import LayerInfo

__all__ = ["BLOCKED_OPSET", "DEFAULT_OPSET", "Graph", "LayerCodes", "SHAPE_OPS", "WEIGHT_FORMATS", "copies",
           "replace_all", "rewrite", "to_int_tensor"]

WEIGHT_FORMATS = ("int8", "auto")
BLOCKED_OPSET = 21  # blocked DequantizeLinear and the 4-bit integer types
DEFAULT_OPSET = 21
_WEIGHT_OPS = {"Conv": 1, "Gemm": 1, "MatMul": None}
# Ops that read only the weight's shape (e.g. "same" padding computed from the kernel size): the
# dequantized weight has the same shape, so they stay as they are.
SHAPE_OPS = ("Shape", "Size")


@dataclass
class LayerCodes:
    """One compressed layer as the exporter needs it; codes is None for a float (pruned-only) layer."""

    name: str
    info: LayerInfo
    codes: Optional[torch.Tensor] = None  # (G, R, C) uint8, 0..2^bits-1
    scale: Optional[torch.Tensor] = None  # (G, R or 1, n_groups) float32
    zero: Optional[torch.Tensor] = None  # like scale (float32 integers)
    bits: Optional[int] = None
    group_size: Optional[int] = None
    strategy: Optional[str] = None


def copies(protos) -> list:
    """Detached copies of protobuf messages, to outlive the repeated field they came from."""
    out = []
    for p in protos:
        c = type(p)()
        c.CopyFrom(p)
        out.append(c)
    return out


def replace_all(field, items) -> None:
    del field[:]
    field.extend(items)


class Graph:
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

    def set_array(self, name: str, value: np.ndarray) -> None:
        """Replace the value of initializer ``name`` (same name, the dtype of ``value``)."""
        from onnx import numpy_helper

        self.inits[name].CopyFrom(numpy_helper.from_array(value, name))
        self._arrays.pop(name, None)

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


def to_int_tensor(q: np.ndarray, kind: str, name: str):
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


def _weight_arrays(layer: LayerCodes, fmt: str, opset: int):
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


def _add_dequantize(g: Graph, layer: LayerCodes, wname: str, perm: Optional[List[int]], out: str, fmt: str,
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
    g.new_inits += [to_int_tensor(q, kind, qn), numpy_helper.from_array(np.ascontiguousarray(s, np.float32), sn),
                    to_int_tensor(np.ascontiguousarray(z), kind, zn)]
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


def _compute_users(g: Graph, layer: LayerCodes, wname: str):
    """(direct users, [(transpose node, perm, its users)]) of the weight that compute with it (shape
    reads are left out, also of a Transpose); ValueError for any other use."""

    def check(node, idx, via):
        op = node.op_type
        if op in SHAPE_OPS:
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


def _add_input_quantizer(g: Graph, layer: LayerCodes, node, input_index: int, q: ActivationQuantizer) -> None:
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


def rewrite(model_proto, layers: Dict[str, LayerCodes], quantizers: Dict[str, ActivationQuantizer], fmt: str,
             opset: int, activations: bool) -> Tuple[Dict[str, Dict[str, Any]], Dict[str, Dict[str, Any]]]:
    g = Graph(model_proto)
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
        nodes.extend(copies([n]))  # the originals go with the old node list
    keep = copies(t for t in g.graph.initializer if t.name not in g.drop_inits)
    replace_all(g.graph.node, nodes)
    replace_all(g.graph.initializer, keep + g.new_inits)
    return report, g.weight_dq
