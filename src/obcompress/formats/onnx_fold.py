"""Folding a W+A graph for onnxruntime's integer kernels (``export_onnx(fold_batchnorm=True)``).

onnxruntime replaces DequantizeLinear(x) -> Conv(DequantizeLinear(w)) -> QuantizeLinear(y) by its
integer QLinearConv only when the Conv's output goes to that one QuantizeLinear and nothing else. The
traced graph has a BatchNormalization after each conv, often a clamp (ReLU6 is a Clip) and, for
"same" padding, a Pad before the next conv's input quantizer; all three are rewritten away here,
each exactly (up to float rounding): the next layer's codes are the ones the simulation computes.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import numpy as np

from .onnx_graph import SHAPE_OPS, Graph, LayerCodes, copies, replace_all

__all__ = ["fold_for_integer_kernels"]

_CLAMPS = ("Clip", "Relu")
_CODE_RANGE = {"uint8": (0, 255), "int8": (-128, 127)}


def _constant(g: Graph, producers: Dict[str, Any], name: str) -> Optional[np.ndarray]:
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


def _cast_constants(g: Graph, producers) -> None:
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


def _fold_batchnorm(g: Graph, producers, outputs: set, layer: LayerCodes, rec: Dict[str, Any], conv) -> bool:
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
        g.set_array(rec["zero"], np.full(O, z, z.dtype))
        dq.attribute.append(helper.make_attribute("axis", 0))
    g.set_array(rec["scale"], folded.astype(np.float32))
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


def _fold_pad(g: Graph, producers, layer: LayerCodes, conv) -> bool:
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


def _quantize_output(g: Graph, producers, outputs: set, layer: LayerCodes, conv, after: Dict[int, list]) -> List[str]:
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


def _drop_dead(g: Graph, outputs: set, after: Dict[int, list]) -> None:
    """Remove nodes whose outputs nothing reads (ONNX nodes have no side effects)."""
    while True:
        live = [n for n in g.nodes if id(n) not in g.removed]
        read = {x for n in live for x in n.input} | outputs
        read.update(x for ns in after.values() for n in ns for x in n.input)
        dead = [n for n in live if not any(o in read for o in n.output if o)]
        if not dead:
            return
        g.removed.update(id(n) for n in dead)


def fold_for_integer_kernels(model_proto, layers: Dict[str, LayerCodes], weight_dq: Dict[str, Dict[str, Any]]):
    """The exact rewrites above, for every conv with a quantized weight; returns (what was folded or
    inserted per layer, the layers whose Conv now reads dequantized input and weight and feeds one
    QuantizeLinear: the pattern onnxruntime runs as QLinearConv)."""
    g = Graph(model_proto)
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
        users = [(n, i) for n, i in g.consumers(rec["out"]) if n.op_type not in SHAPE_OPS]
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

    nodes, copied = [], {}
    for n in g.nodes:
        if id(n) in g.removed:
            continue
        copied[id(n)], = copies([n])  # the originals go with the old node list
        nodes.append(copied[id(n)])
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
        c = copied[id(conv)]
        data, weight = made.get(c.input[0]), made.get(c.input[1])
        out = readers.get(c.output[0], [])
        if data is not None and weight is not None and data.op_type == weight.op_type == "DequantizeLinear" \
                and len(out) == 1 and out[0].op_type == "QuantizeLinear" and c.output[0] not in outputs:
            ready.append(name)
    inits = copies(t for t in list(g.graph.initializer) + g.new_inits if t.name in readers or t.name in outputs)
    # Shapes of values that the rewrite removed would describe nothing.
    infos = copies(v for v in g.graph.value_info if v.name in made)
    replace_all(g.graph.node, nodes)
    replace_all(g.graph.initializer, inits)
    replace_all(g.graph.value_info, infos)
    return {k: v for k, v in folded.items() if v}, ready
