"""ONNX export: integer weights that dequantize to the compressed weights bit for bit, onnxruntime
outputs equal to the PyTorch model's, activation Q/DQ that rounds as the simulation does."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from obcompress.api import compress  # noqa: E402
from obcompress.formats import load, save  # noqa: E402
from obcompress.formats.onnx_export import _activation_hooks_suspended, export_dense_onnx, export_onnx  # noqa: E402
from obcompress.formats.onnx_runtime import ort_optimized_ops, ort_session  # noqa: E402

# Weight-only graphs compute what PyTorch computes up to float32 summation order.
RTOL = 1e-5


class SmallCNN(nn.Module):
    """digits-cnn sized: a conv + BatchNorm, a depthwise conv, a pointwise conv (no bias) and a linear layer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw = nn.Conv2d(16, 32, 1, bias=False)
        self.fc = nn.Linear(32 * 16, 10)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        x = F.relu(self.dw(x))
        x = F.max_pool2d(F.relu(self.pw(x)), 2)
        return self.fc(x.flatten(1))


class Block(nn.Module):
    """A pre-norm transformer block on (B, T, C) with its own q/k/v/o and MLP linear layers."""

    def __init__(self, c=32, heads=4):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(c), nn.LayerNorm(c)
        self.q, self.k, self.v, self.o = (nn.Linear(c, c) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)

    def forward(self, x):
        B, T, C = x.shape
        h = self.ln1(x)
        q, k, v = (m(h).reshape(B, T, self.heads, -1).transpose(1, 2) for m in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, C)
        x = x + self.o(a)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


def _cnn():
    torch.manual_seed(0)
    m = SmallCNN()
    with torch.no_grad():  # running statistics that are not the identity, so that BatchNorm matters
        m.bn.running_mean.uniform_(-0.2, 0.2)
        m.bn.running_var.uniform_(0.5, 2.0)
    return m.eval()


def _images(n=64, seed=1):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def _run(path, x, outputs=None, optimize=True, exact=True):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if optimize:
        sess = ort_session(path, exact=exact)
    else:
        sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {sess.get_inputs()[0].name: x.numpy()}
    return sess.run(outputs, feeds)


def _with_outputs(path, names, dst, elem=None):
    """A copy of the model that also outputs the values ``names`` (to look inside the graph)."""
    m = onnx.load(str(path))
    for n in names:
        m.graph.output.append(onnx.helper.make_tensor_value_info(n, elem or onnx.TensorProto.FLOAT, None))
    onnx.save(m, str(dst))
    return dst


def _dequantized_weights(path, tmp_path):
    """Each weight DequantizeLinear's output, computed by onnxruntime without graph optimisation."""
    m = onnx.load(str(path))
    inits = {t.name for t in m.graph.initializer}
    names = [n.output[0] for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    outs = _run(_with_outputs(path, names, tmp_path / "dq.onnx"), _images(2), names, optimize=False)
    return dict(zip(names, outs))


def _weight_of(model, name):
    return dict(model.named_modules())[name].weight.detach().numpy()


def _same_weight(d, W):
    """``d`` is W as a DequantizeLinear yields it: as is, 2-D before a Reshape, or transposed for MatMul."""
    return d.size == W.size and (np.array_equal(d.reshape(W.shape), W) or (d.ndim == 2 and np.array_equal(d.T, W)))


W8 = {"solver": "rtn", "quantization": {"num_bits": 8}}
# One model, every granularity: a 3-bit per-tensor grid, 8-bit per channel, 4-bit groups of 8
# columns (blocked DequantizeLinear, 2-D then reshaped for a conv), 4-bit asymmetric per channel.
MIXED = {"solver": "rtn", "quantization": {"num_bits": 8}, "layers": {
    "conv": {"quantization": {"num_bits": 3, "strategy": "tensor"}},
    "pw": {"quantization": {"num_bits": 4, "strategy": "group", "group_size": 8}},
    "fc": {"solver": "gptq", "quantization": {"num_bits": 4, "symmetric": False}},
}}
GRANULARITY = {"conv": "tensor", "dw": "channel", "pw": "block", "fc": "channel"}
BITS = {"conv": 3, "dw": 8, "pw": 4, "fc": 4}


@pytest.fixture(scope="module")
def mixed():
    model = _cnn()
    return model, compress(model, MIXED, [_images()], num_calibration_samples=64, progress=False)


@pytest.mark.parametrize("weight_format", ["auto", "int8"])
def test_weight_only_matches_pytorch_with_integer_weights(mixed, weight_format, tmp_path):
    model, result = mixed
    out = export_onnx(model, _images(4), tmp_path / "m.onnx", result=result, weight_format=weight_format)
    assert out.path.stat().st_size == out.bytes and out.dynamic_batch
    kinds = {n: "int4" if weight_format == "auto" and BITS[n] <= 4 else "int8" for n in BITS}
    assert out.layers == {n: {"weight": kinds[n], "bits": BITS[n], "granularity": GRANULARITY[n],
                              "activation_bits": None} for n in BITS}

    m = onnx.load(str(out.path))
    inits = {t.name: t for t in m.graph.initializer}
    # the exporter makes pw's zero bias from the weight's shape, now the dequantized weight's
    assert any(n.op_type == "Shape" and n.input[0] == "pw.weight" for n in m.graph.node)
    for name, kind in kinds.items():
        assert f"{name}.weight" not in inits  # no float copy of a quantized weight is left
        q = inits[f"{name}.weight_quantized"]
        # 8-bit codes as uint8 with their zero point: onnxruntime's u8u8 kernels are exact on every x86
        assert q.data_type == (onnx.TensorProto.INT4 if kind == "int4" else onnx.TensorProto.UINT8)
        n = _weight_of(model, name).size
        assert len(q.raw_data) == ((n + 1) // 2 if kind == "int4" else n)  # int4: two to a byte
    # every weight dequantizes to the compressed float weight exactly
    deq = _dequantized_weights(out.path, tmp_path)
    for name in BITS:
        W = _weight_of(model, name)
        assert any(_same_weight(d, W) for d in deq.values()), name

    x = _images(13, seed=2)  # another batch size than the example's: the batch is dynamic
    with torch.no_grad():
        y = model(x).numpy()
    (y_ort,) = _run(out.path, x)
    np.testing.assert_allclose(y_ort, y, rtol=RTOL, atol=RTOL * np.abs(y).max())
    folded = ort_session(out.path, fold_weights=True)  # weights dequantized once, at load
    np.testing.assert_allclose(folded.run(None, {"x": x.numpy()})[0], y, rtol=RTOL, atol=RTOL * np.abs(y).max())


def test_dense_export_is_the_float_model(tmp_path):
    model = _cnn()
    out = export_dense_onnx(model, _images(4), tmp_path / "dense.onnx")
    assert out.bytes > 4 * sum(_weight_of(model, n).size for n in BITS)
    assert {t.data_type for t in onnx.load(str(out.path)).graph.initializer} <= {onnx.TensorProto.FLOAT,
                                                                                  onnx.TensorProto.INT64}
    x = _images(5, seed=3)
    with torch.no_grad():
        y = model(x).numpy()
    np.testing.assert_allclose(_run(out.path, x)[0], y, rtol=RTOL, atol=RTOL * np.abs(y).max())


def _input_codes_check(model, result, path, x, tmp_path, exact=True):
    """Each layer's input codes in onnxruntime against the quantizer's on the PyTorch inputs, and the
    output difference against what the differing codes of the last layer's input explain."""
    quantizers = result.activation_quantizers
    names = list(quantizers)
    captured = {}
    modules = dict(model.named_modules())
    # prepend: the raw input, before the fake-quantizing pre-hook that compress attached
    handles = [modules[n].register_forward_pre_hook(lambda m, a, n=n: captured.__setitem__(n, a[0].clone()),
                                                    prepend=True) for n in names]
    with torch.no_grad():
        y = model(x)
    for h in handles:
        h.remove()
    probe = _with_outputs(path, [f"{n}/input_quantized" for n in names], tmp_path / "probe.onnx",
                          onnx.TensorProto.UINT8)
    y_ort, *codes = _run(probe, x, exact=exact)
    diffs = {}
    for n, c in zip(names, codes):
        ref = quantizers[n].codes(captured[n]).numpy()
        d = c.astype(np.int64) - ref
        # float32 sums in another order move a value across a rounding boundary now and then: one step
        assert np.abs(d).max() <= 1 and (d != 0).mean() < 5e-3, n
        diffs[n] = d
    assert not diffs[names[0]].any()  # the model input itself is rounded exactly as PyTorch does
    return y.numpy(), y_ort, diffs




def _last_layer_bound(result, model, name, diffs, y, rel):
    """|y_ort - y| allowed at the output of ``name``, the last layer: scale * |W| for each input code
    that differs, plus float rounding."""
    s = result.activation_quantizers[name].scale
    W = np.abs(_weight_of(model, name))
    d = np.abs(diffs[name]).reshape(-1, W.shape[1])
    return s * d @ W.T + rel * (1 + np.abs(y).reshape(d.shape[0], -1))


def test_weights_and_activations(tmp_path):
    model = _cnn()
    # 8-bit symmetric inputs, and 4 bits for fc: fewer than 8 bits clip to the quantizer's range
    recipe = {"solver": "rtn", "quantization": {"num_bits": 8, "activations": {"num_bits": 8}},
              "layers": {"fc": {"quantization": {"activations": {"num_bits": 4, "symmetric": False}}}}}
    result = compress(model, recipe, [_images()], num_calibration_samples=64, progress=False)
    out = export_onnx(model, _images(4), tmp_path / "wa.onnx", result=result)
    assert {n: e["activation_bits"] for n, e in out.layers.items()} == {"conv": 8, "dw": 8, "pw": 8, "fc": 4}
    ops = [n.op_type for n in onnx.load(str(out.path)).graph.node]
    # symmetric 8-bit inputs after ReLU: the clamp at 0 is not the quantizer's, so conv and dw get a
    # Q/DQ pair on their outputs (fold_batchnorm, on for W+A) and the ReLU stays
    assert out.folded == {"conv": ["BatchNormalization", "QuantizeLinear"], "dw": ["QuantizeLinear"]}
    assert out.integer_ready == ["conv", "dw"] and "BatchNormalization" not in ops
    assert ops.count("QuantizeLinear") == 4 + 2 and ops.count("Clip") == 1 and ops.count("Relu") == 3
    x = torch.randn(50, 1, 8, 8, generator=torch.Generator().manual_seed(4)) * 1.5  # beyond the calibrated range
    y, y_ort, diffs = _input_codes_check(model, result, out.path, x, tmp_path)
    assert (np.abs(y_ort - y) <= _last_layer_bound(result, model, "fc", diffs, y, 1e-5)).all()


class SamePadConv(nn.Conv2d):
    """TensorFlow's "same" padding of a stride-2 conv, as EfficientNet-Lite's port does it: a Pad first."""

    def forward(self, x):
        return super().forward(F.pad(x, (0, 1, 0, 1)))


class ConvBnNet(nn.Module):
    """EfficientNet-Lite's pattern: conv + BatchNorm + ReLU6 stages, a stride-2 conv with "same" padding,
    a pointwise conv whose BatchNorm goes straight to the next conv, a pooled head."""

    def __init__(self):
        super().__init__()
        self.stem = SamePadConv(3, 8, 3, stride=2, bias=False)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.pw = nn.Conv2d(8, 16, 1)
        self.pw2 = nn.Conv2d(16, 16, 1, bias=False)
        self.bns = nn.ModuleList(nn.BatchNorm2d(c) for c in (8, 8, 16, 16))
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = F.relu6(self.bns[0](self.stem(x)))
        x = F.relu6(self.bns[1](self.dw(x)))
        x = self.bns[2](self.pw(x))
        x = F.relu6(self.bns[3](self.pw2(x)))
        return self.fc(x.mean((2, 3)))


def _conv_bn_net():
    torch.manual_seed(0)
    m = ConvBnNet()
    with torch.no_grad():
        for bn in m.bns:
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.3, 3.0)
            bn.weight.uniform_(0.5, 3.0)
            bn.weight[::3] *= -1  # negative factors: the folded weight scales are negative there
            bn.bias.uniform_(-0.5, 1.5)
    return m.eval()


def _photos(n, seed):
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("symmetric", [False, True])
def test_fold_batchnorm_gives_integer_convs_with_the_simulated_codes(symmetric, tmp_path):
    model = _conv_bn_net()
    acts = {"num_bits": 8, "symmetric": symmetric}
    recipe = {"solver": "rtn", "quantization": {"num_bits": 8, "activations": acts}}
    if symmetric:  # pw2's input at 4 bits: the quantizer's own clamp sits between pw and its Q; one
        # scale for all of dw's weight, which the fold turns into one per channel
        recipe["layers"] = {"pw2": {"quantization": {"activations": {"num_bits": 4, "symmetric": False}}},
                            "dw": {"quantization": {"strategy": "tensor"}}}
    result = compress(model, recipe, [_photos(64, 0)], num_calibration_samples=64, progress=False)
    out = export_onnx(model, _photos(4, 1), tmp_path / "f.onnx", result=result)
    # asymmetric 8-bit codes start at 0 and end at or below 6: ReLU6 does nothing the quantizer does
    # not; a symmetric quantizer has codes below 0, so a Q/DQ pair goes on the conv output instead
    after = ["QuantizeLinear"] if symmetric else ["Clip"]
    assert out.folded == {"stem": ["BatchNormalization", "Pad"] + after, "dw": ["BatchNormalization"] + after,
                          "pw": ["BatchNormalization"] + (["QuantizeLinear"] if symmetric else []),
                          "pw2": ["BatchNormalization"]}
    assert out.integer_ready == ["stem", "dw", "pw"]  # pw2 feeds a mean, not a quantizer
    ops = [n.op_type for n in onnx.load(str(out.path)).graph.node]
    assert "BatchNormalization" not in ops and "Pad" not in ops
    # the integer codes are still the compressed weights' codes, only their scales changed
    for name, e in out.layers.items():
        assert e["weight"] == "int8"

    counts = ort_optimized_ops(out.path)
    assert counts.get("QLinearConv") == 3 and counts.get("BatchNormalization") is None
    assert "QLinearConv" not in ort_optimized_ops(out.path, exact=True)  # float bias: no integer kernel
    plain = export_onnx(model, _photos(4, 1), tmp_path / "plain.onnx", result=result, fold_batchnorm=False)
    assert plain.folded == {} and plain.integer_ready == []
    assert "QLinearConv" not in ort_optimized_ops(plain.path)

    x = _photos(40, 2)
    for exact in (True, False):
        # exact: float convs with folded weights; default: onnxruntime's QLinearConv (int32 bias)
        y, y_ort, diffs = _input_codes_check(model, result, out.path, x, tmp_path, exact=exact)
        assert (np.abs(y_ort - y) <= _last_layer_bound(result, model, "fc", diffs, y, 1e-5)).all()

    # the folds alone, without activation quantizers: the compressed model to float rounding
    wo = export_onnx(model, _photos(4, 1), tmp_path / "w.onnx", result=result, activations=False, fold_batchnorm=True)
    assert {n: f[0] for n, f in wo.folded.items()} == dict.fromkeys(["stem", "dw", "pw", "pw2"], "BatchNormalization")
    assert wo.integer_ready == []
    with _activation_hooks_suspended(model), torch.no_grad():
        y = model(x).numpy()
    np.testing.assert_allclose(_run(wo.path, x)[0], y, rtol=RTOL, atol=RTOL * np.abs(y).max())


def test_sparse_24_w4a8_zeros_are_exact_and_artifact_export_is_the_same(tmp_path):
    model = _cnn()
    recipe = {"solver": "sparsegpt", "sparsity": {"mask_structure": "2:4"},
              "quantization": {"num_bits": 4, "activations": {"num_bits": 8, "symmetric": False}},
              "ignore": ["conv", "dw"]}  # 9 and 1x9 columns do not split into groups of 4
    result = compress(model, recipe, [_images()], num_calibration_samples=64, progress=False)
    a = export_onnx(model, _images(4), tmp_path / "a.onnx", result=result)
    assert set(a.layers) == {"pw", "fc"}
    deq = _dequantized_weights(a.path, tmp_path)
    for name in ("pw", "fc"):
        W = _weight_of(model, name)
        mask = result.states[name].mask.reshape(W.shape).numpy()
        assert (W[~mask] == 0).all() and (~mask).mean() == 0.5
        d = next(d for d in deq.values() if _same_weight(d, W)).reshape(W.shape)
        assert (d[~mask] == 0).all() and not np.signbit(d[~mask]).any()
    x = _images(9, seed=5)
    y, y_ort, diffs = _input_codes_check(model, result, a.path, x, tmp_path)
    assert (np.abs(y_ort - y) <= _last_layer_bound(result, model, "fc", diffs, y, 1e-5)).all()

    # the artifact, loaded into a fresh model, exports to the very same graph
    save(model, result, tmp_path / "art")
    fresh = load(tmp_path / "art", SmallCNN().eval())
    b = export_onnx(fresh, _images(4), tmp_path / "b.onnx", artifact_dir=tmp_path / "art")
    assert a.layers == b.layers
    ia = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(a.path)).graph.initializer}
    ib = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(b.path)).graph.initializer}
    assert ia.keys() == ib.keys() and all(np.array_equal(ia[k], ib[k]) for k in ia)
    assert np.array_equal(_run(a.path, x)[0], _run(b.path, x)[0])
    # the fake-quantizing hooks that load() attached are back after the export
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_transformer_block(tmp_path):
    torch.manual_seed(0)
    model = Block().eval()
    data = [torch.randn(8, 6, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    # attention projections 4-bit in groups of 16 columns, weight-only; output and MLP 8w8a
    recipe = {"solver": "gptq", "quantization": {"num_bits": 8, "activations": {"num_bits": 8}}, "layers": {
        "re:[qkv]": {"quantization": {"num_bits": 4, "strategy": "group", "group_size": 16, "activations": None}}}}
    result = compress(model, recipe, data, num_calibration_samples=16, progress=False)
    out = export_onnx(model, data[0], tmp_path / "b.onnx", result=result)
    assert {n: (e["weight"], e["granularity"], e["activation_bits"]) for n, e in out.layers.items()} == {
        **{n: ("int4", "block", None) for n in "qkv"}, **{n: ("int8", "channel", 8) for n in ("o", "fc1", "fc2")}}
    graph = onnx.load(str(out.path)).graph
    inits = {t.name for t in graph.initializer}
    # the exporter's Transpose of each weight is folded into the integer initializer of its MatMul
    assert not any(n.op_type == "Transpose" and n.input[0] in inits for n in graph.node)
    x = torch.randn(3, 6, 32, generator=torch.Generator().manual_seed(9))
    y, y_ort, diffs = _input_codes_check(model, result, out.path, x, tmp_path)
    # fc2's output is added to the residual stream, which carries the float rounding of the attention
    assert (np.abs(y_ort - y).reshape(-1, 32) <= _last_layer_bound(result, model, "fc2", diffs, y, 1e-4)).all()


# --------------------------------------------------------------------------------------------- errors


class TiedHead(nn.Module):
    """The output layer's weight is also the embedding table: a Gather that no integer weight can feed."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, 20)

    def forward(self, ids):
        return self.head(F.embedding(ids % 20, self.head.weight))


def test_weight_used_by_an_unsupported_op_names_the_layer(tmp_path):
    torch.manual_seed(0)
    model = TiedHead().eval()
    ids = torch.randint(0, 20, (4, 5), generator=torch.Generator().manual_seed(0))
    result = compress(model, W8, [ids], num_calibration_samples=4, progress=False)
    with pytest.raises(ValueError, match=r"layer head: .*Gather"):
        export_onnx(model, ids, tmp_path / "t.onnx", result=result)
    assert not (tmp_path / "t.onnx").exists()


def test_act_order_groups_are_refused(tmp_path):
    model = _cnn()
    recipe = {"solver": "gptq", "quantization": {"num_bits": 4, "strategy": "group", "group_size": 8,
                                                 "act_order": True}, "targets": ["fc"]}
    result = compress(model, recipe, [_images()], num_calibration_samples=64, progress=False)
    assert result.states["fc"].grids[0].g_idx is not None  # act order formed the groups out of column order
    with pytest.raises(ValueError, match="layer fc: .*act-order"):
        export_onnx(model, _images(4), tmp_path / "x.onnx", result=result)


def test_bad_inputs(tmp_path):
    model = _cnn()
    result = compress(model, {"solver": "rtn", "quantization": {"num_bits": 4, "strategy": "group",
                                                                  "group_size": 8}, "targets": ["fc"]},
                      [_images()], num_calibration_samples=64, progress=False)
    x = _images(4)
    p = tmp_path / "m.onnx"
    cases = [
        (dict(model=object(), example_inputs=x, path=p, result=result), "torch.nn.Module"),
        (dict(model=model, example_inputs=x, path=p), "exactly one of"),
        (dict(model=model, example_inputs=x, path=p, result=result, artifact_dir=tmp_path), "exactly one of"),
        (dict(model=model, example_inputs=x, path=p, result=result, weight_format="int3"), "weight_format"),
        (dict(model=model, example_inputs=x, path=p, result=result, opset=17), "opset"),
        (dict(model=model, example_inputs=x, path=p, result=result, opset="21"), "opset"),
        (dict(model=model, example_inputs=x, path=p, result=result, activations="yes"), "activations"),
        (dict(model=model, example_inputs=x, path=p, result=result, fold_batchnorm=1), "fold_batchnorm"),
        (dict(model=model, example_inputs=None, path=p, result=result), "example_inputs"),
        (dict(model=model, example_inputs=(x, "a"), path=p, result=result), r"example_inputs\[1\]"),
        (dict(model=model, example_inputs=torch.tensor(1.0), path=p, result=result), "scalar"),
        (dict(model=model, example_inputs=x, path=tmp_path, result=result), "directory"),
        (dict(model=model, example_inputs=x, path=p, result="result"), "Result"),
        (dict(model=_cnn(), example_inputs=x, path=p, result=result), "layer fc: .*not a module of this model"),
        (dict(model=model, example_inputs=x, path=p, artifact_dir=tmp_path / "none"), "not found"),
        # a group grid needs blocked DequantizeLinear
        (dict(model=model, example_inputs=x, path=p, result=result, opset=20), "layer fc: .*opset >= 21"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            export_onnx(**kwargs)
    with torch.no_grad():
        model.fc.weight.mul_(1.01)
    with pytest.raises(ValueError, match="layer fc: .*not on the grid"):
        export_onnx(model, x, p, result=result)
    assert not p.exists()


def test_artifact_not_loaded_into_the_model(tmp_path):
    model = _cnn()
    result = compress(model, W8, [_images()], num_calibration_samples=64, progress=False)
    save(model, result, tmp_path / "art")
    with pytest.raises(ValueError, match="load the artifact into the model first"):
        export_onnx(_cnn(), _images(4), tmp_path / "m.onnx", artifact_dir=tmp_path / "art")
    with pytest.raises(ValueError, match="threads"):
        ort_session(tmp_path / "m.onnx", threads=0)


SPEC = '''
import torch
from torch import nn


def factory():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 10)).eval()
    data = [torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    return model, data, lambda m: {"accuracy": 0.0}
'''


def test_cli_export(tmp_path, capsys):
    from obcompress.cli import main

    (tmp_path / "spec.py").write_text(SPEC)
    spec = f"{tmp_path / 'spec.py'}:factory"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("solver: rtn\nquantization:\n  num_bits: 4\n  activations:\n    num_bits: 8\n")
    art, out = tmp_path / "art", tmp_path / "m.onnx"
    assert main(["compress", "--model", spec, "--recipe", str(recipe), "--out", str(art),
                 "--calibration-samples", "32", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["export", "--model", spec, "--artifact", str(art), "--format", "onnx", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"{out.stat().st_size:,d} bytes" in text and "2 int4+a8" in text and "dynamic batch" in text
    with pytest.raises(SystemExit) as e:
        main(["export", "--model", spec, "--artifact", str(tmp_path / "none"), "--out", str(out)])
    assert e.value.code == 2 and "not found" in capsys.readouterr().err


def test_onnx_latency_cost():
    from obcompress.search.costs import COSTS, OnnxLatencyCost, cost_from_dict, make_cost
    from obcompress.search.space import LayerGeometry, Variant

    cost = make_cost("onnx_latency", batch=2, activation_bits=8, repeats=2, warmup=0)
    assert COSTS["onnx_latency"] is OnnxLatencyCost and cost_from_dict(cost.to_dict()) == cost
    linear = LayerGeometry("fc", "linear", 1, 32, 64, positions=6)
    dw = LayerGeometry("dw", "conv2d", 16, 1, 9, taps=9, positions=64)
    for geom in (linear, dw):
        for variant in (Variant(), Variant(bits=8), Variant(bits=4), Variant("2:4", bits=4) if geom is linear
                        else Variant(sparsity=0.5, bits=4)):
            assert cost(geom, variant) > 0
    # a pruned variant is its unpruned variant to onnxruntime: measured once
    assert cost.measurements == 6 and cost(linear, Variant(sparsity=0.3, bits=4)) == cost(linear, Variant(bits=4))
    assert cost.measurements == 6
    for bad in ({"activation_bits": 9}, {"batch": 0}, {"threads": True}, {"cache_path": "x"}):
        with pytest.raises(ValueError, match="onnx_latency cost"):
            make_cost("onnx_latency", **bad)
