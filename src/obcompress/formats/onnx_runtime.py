"""Running exported models in onnxruntime on the CPU: sessions, the ops it chose, per-layer latency.

onnxruntime (1.32 measured) rewrites ``DequantizeLinear`` -> ``MatMul`` into its ``MatMulNBits``
kernel (int4 and int8 weights), by default at accuracy level 4, which quantizes the activations
to int8 per block at run time: outputs then differ from the PyTorch model by about 0.5 % relative.
It also rounds the float bias of a Conv/Gemm whose input and weight are both dequantized to
int32 steps (input scale x weight scale), which its integer kernels need (a folded BatchNorm's
shift is in that bias). ``ort_session(..., exact=True)`` turns both off; outputs then match
PyTorch to float32 rounding, and no conv runs as QLinearConv.

``onnx_layer_latency`` times one layer as ``export_onnx`` writes it; ``search.costs.OnnxLatencyCost``
is the cost model built on it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Dict, Optional, Union

import numpy as np

from ..checks import check_bits, check_bool, check_int
from ..geometry import LayerGeometry, check_geometry, kernel_shape, output_shape
from ..timing import median_seconds
from .onnx_graph import DEFAULT_OPSET, WEIGHT_FORMATS, to_int_tensor

__all__ = ["onnx_layer_latency", "ort_optimized_ops", "ort_session"]


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

    check_int(threads, "threads")
    if not Path(path).is_file():
        raise ValueError(f"ONNX file not found: {path}")
    check_bool(exact, "exact")
    check_bool(fold_weights, "fold_weights")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
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


def _layer_graph(geom: LayerGeometry, bits: Optional[int], activation_bits: Optional[int], weight_format: str,
                 batch: int):
    """One layer as ``export_onnx`` writes it (random weights), and its feed."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    G, R, C, taps = geom.groups, geom.rows, geom.cols, geom.taps
    O = G * R
    W = rng.standard_normal((O, C)).astype(np.float32)
    linear = geom.kind in ("linear", "conv1d_hf")
    spatial = output_shape(geom)
    if linear:
        shape_w = (C, O)  # MatMul(x, W^T), as the exporter feeds a linear layer
        W = W.T.copy()
        x = rng.standard_normal((batch * spatial[0], C)).astype(np.float32)
        out_axis = 1
    else:
        ks = kernel_shape(geom)
        shape_w = (O, C // taps, *ks)
        W = W.reshape(shape_w)
        x = rng.standard_normal((batch, G * (C // taps), *spatial)).astype(np.float32)
        out_axis = 0
    inits, nodes = [], []
    wname = "weight"
    if bits is None:
        inits.append(numpy_helper.from_array(W, wname))
    else:
        half = 2 ** (bits - 1)
        amax = np.abs(W).max(axis=tuple(i for i in range(W.ndim) if i != out_axis))
        scale = np.maximum(amax, 1e-8).astype(np.float32) / (half - 0.5)
        view = [1] * W.ndim
        view[out_axis] = -1
        q = np.clip(np.round(W / scale.reshape(view)), -half, half - 1)
        kind = "int4" if weight_format == "auto" and bits <= 4 else "int8"
        inits += [to_int_tensor(q, kind, "weight_quantized"), numpy_helper.from_array(scale, "weight_scale"),
                  to_int_tensor(np.zeros(scale.shape, np.int8), kind, "weight_zero_point")]
        nodes.append(helper.make_node("DequantizeLinear", ["weight_quantized", "weight_scale", "weight_zero_point"],
                                      [wname], axis=out_axis))
    quantize_io = activation_bits is not None and bits is not None
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


def onnx_layer_latency(geom: LayerGeometry, bits: Optional[int] = None, *, activation_bits: Optional[int] = None,
                       batch: int = 1, threads: int = 1, repeats: int = 15, warmup: int = 3,
                       weight_format: str = "auto", exact: bool = False) -> float:
    """Median seconds of one forward of a layer in onnxruntime, as ``export_onnx`` writes it.

    ``geom`` gives the layer and its input: a linear layer gets round(positions) tokens per
    sample, a conv stride 1, "same" padding and the square (or 1-D) spatial size nearest to
    ``positions`` (``geometry.output_shape``), as the torch latency cost builds them. With ``bits``
    the weight is stored as 8-bit codes (int4 for <= 4 bits with ``weight_format="auto"``) behind
    DequantizeLinear; with ``activation_bits`` too, its input and output pass Quantize/
    DequantizeLinear (the output one stands for the next layer's input quantizer). Weights are
    random and dense: onnxruntime's CPU kernels have no sparse path, so a pruned layer costs what
    the dense one does. Sessions are onnxruntime's defaults (``exact=False``), timed by
    ``timing.median_seconds`` (``repeats`` samples after ``warmup`` runs).
    """
    geom = check_geometry(geom)
    where = f"layer {geom.name!r}"
    if bits is not None:
        check_bits(bits, f"{where}: bits")
    for key, value, lo in (("batch", batch, 1), ("threads", threads, 1), ("repeats", repeats, 1), ("warmup", warmup, 0)):
        check_int(value, f"{where}: {key}", lo)
    if activation_bits is not None:
        check_bits(activation_bits, f"{where}: activation_bits")
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"weight_format must be one of {WEIGHT_FORMATS}, got {weight_format!r}")
    model, feeds = _layer_graph(geom, bits, activation_bits, weight_format, batch)
    with tempfile.TemporaryDirectory(prefix="obcompress-layer-") as tmp:
        path = Path(tmp) / "layer.onnx"
        path.write_bytes(model.SerializeToString())
        sess = ort_session(path, threads=threads, exact=exact)
    return median_seconds(lambda: sess.run(None, feeds), repeats=repeats, warmup=warmup)
