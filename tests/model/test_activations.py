import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from obcompress.model import find_layers
from obcompress.model.activations import (
    ActivationQuantizer,
    _InputObserver,
    attach,
    calibrate_activation_quantizers,
    quantizers_from_dict,
    quantizers_to_dict,
)
from obcompress.recipe import ActivationScheme


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _heavy_tailed(n, seed=0):
    # Student-t with 2 degrees of freedom: a few values lie far out, as in real activations.
    g = _gen(seed)
    z = torch.randn(n, generator=g)
    chi2 = torch.randn(n, 2, generator=g).square().sum(1)
    return z / (chi2 / 2).sqrt()


def _laplace(n, seed=0):
    # Exponential tails: the p=2.4 optimum clips well inside the min-max range, within the search's reach.
    g = _gen(seed)
    return torch.empty(n).exponential_(generator=g) * torch.sign(torch.randn(n, generator=g))


def _pnorm_error(q, x, p=2.4):
    return float((q(x) - x).abs().pow(p).sum())


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(self.drop(torch.relu(self.conv(x))).flatten(1))


class Recorder:
    """The inputs each module receives, seen from inside its forward (after any pre-hook)."""

    def __init__(self, modules):
        self.inputs = {name: [] for name in modules}
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name):
        def hook(module, args, output):
            self.inputs[name].append(args[0].detach().clone())
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def _batches(sizes=(5, 3, 4), seed=0):
    g = _gen(seed)
    return [torch.randn(n, 3, 4, 4, generator=g) * 2 + 0.5 for n in sizes]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("mse", [False, True])
def test_quantizer_values_lie_on_its_grid(bits, symmetric, mse):
    x = _heavy_tailed(3000) + 0.7
    q = ActivationQuantizer.fit(x, bits, symmetric, mse)
    y = q(x)
    codes = y / q.scale + q.zero
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert codes.min() >= -1e-3 and codes.max() <= q.maxq + 1e-3
    assert torch.unique(y).numel() <= 2**bits
    assert torch.equal(q(y), y)  # the grid's points are fixed points of the quantizer
    assert torch.equal(torch.unique(y), torch.unique(q.levels()[q.codes(x)]))
    # Zero is always representable: padding and post-ReLU zeros stay exactly zero.
    assert float(q(torch.zeros(1))) == 0.0
    if symmetric:
        assert q.zero == 2 ** (bits - 1)
    if not mse:
        # Within the min-max range no value moves by more than half a step.
        assert float((y - x).abs().max()) <= q.scale / 2 * (1 + 1e-5)


def test_asymmetric_quantizer_spends_all_levels_on_a_nonnegative_range():
    x = torch.rand(1000, generator=_gen()) * 3
    q = ActivationQuantizer.fit(x, 4, symmetric=False)
    assert q.zero == 0
    assert q.scale == pytest.approx(float(x.max()) / 15, rel=1e-6)


def test_quantizer_dict_round_trip_through_json():
    qs = {"a": ActivationQuantizer.fit(_heavy_tailed(500), 4, True, True),
          "b.c": ActivationQuantizer.fit(torch.rand(500, generator=_gen()), 3, False, False)}
    back = quantizers_from_dict(json.loads(json.dumps(quantizers_to_dict(qs))))
    assert back == qs
    x = _heavy_tailed(200, seed=1)
    assert torch.equal(back["a"](x), qs["a"](x))


@pytest.mark.parametrize("bad, match", [
    ({"scale": 0.1, "zero": 7, "bits": 4, "symmetric": True}, "zero point 8"),
    ({"scale": 0.1, "zero": 16, "bits": 4, "symmetric": False}, r"0\.\.15"),
    ({"scale": -1.0, "zero": 0, "bits": 4, "symmetric": False}, "scale"),
    ({"scale": float("nan"), "zero": 0, "bits": 4, "symmetric": False}, "scale"),
    ({"scale": 0.1, "zero": 0, "bits": 9, "symmetric": False}, "2..8"),
    ({"scale": 0.1, "zero": 0, "bits": 4}, "keys"),
])
def test_malformed_quantizer_dict_is_refused_naming_the_layer(bad, match):
    with pytest.raises(ValueError, match=match) as e:
        quantizers_from_dict({"features.3": bad})
    assert "features.3" in str(e.value)


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("tails", ["laplace", "student-t2"])
def test_mse_clip_is_never_worse_than_minmax_in_the_2_4_norm(bits, symmetric, tails):
    x = _laplace(20000, seed=bits) if tails == "laplace" else _heavy_tailed(20000, seed=bits) + 0.3
    plain = ActivationQuantizer.fit(x, bits, symmetric, mse=False)
    clipped = ActivationQuantizer.fit(x, bits, symmetric, mse=True)
    assert _pnorm_error(clipped, x) <= _pnorm_error(plain, x)
    assert clipped.scale <= plain.scale
    if bits <= 4 and tails == "laplace":
        # On long tails clipping matters: the outliers' error is cheaper than a coarse grid.
        assert _pnorm_error(clipped, x) < 0.5 * _pnorm_error(plain, x)


def test_bounded_sample_is_uniform_and_gives_nearly_the_full_data_clip():
    scheme = ActivationScheme(num_bits=4, symmetric=False, mse=True)
    obs = _InputObserver("layer", scheme, max_samples=4096, seed=0)
    chunks = [_laplace(n, seed=i) * (1 + i % 3) for i, n in enumerate([10000, 300, 25000, 7, 5000])]
    for c in chunks:
        obs.add(c.reshape(-1, 1))
        assert obs.values.numel() <= 4096
    x = torch.cat(chunks)
    assert obs.seen == x.numel()
    assert (obs.lo, obs.hi) == (float(x.min()), float(x.max()))
    # Every chunk contributes in proportion to its size (a uniform sample of all values seen).
    assert obs.values.numel() == 4096
    assert torch.isin(obs.values, x).all()
    share_big = float(torch.isin(obs.values, chunks[2]).float().mean())
    assert share_big == pytest.approx(25000 / x.numel(), abs=0.04)
    sampled, full = obs.quantizer(), ActivationQuantizer.fit(x, 4, False, True)
    assert _pnorm_error(sampled, x) <= 1.05 * _pnorm_error(full, x)


def test_calibration_minmax_covers_all_calibration_inputs_and_restores_modes():
    model = Net().train()
    layers = find_layers(model)
    batches = _batches()
    rec = Recorder({n: i.module for n, i in layers.items()})
    with torch.no_grad():
        model.eval()
        for b in batches:
            model(b)
    rec.remove()
    model.train()
    schemes = {"conv": ActivationScheme(8, symmetric=True, mse=False), "fc": ActivationScheme(4, symmetric=False, mse=False)}
    qs = calibrate_activation_quantizers(model, layers, schemes, batches)
    assert model.training and model.drop.training  # the pass ran in eval mode (dropout off) and put it back
    for name, s in schemes.items():
        x = torch.cat([t.reshape(-1) for t in rec.inputs[name]])
        assert qs[name] == ActivationQuantizer.fit(x, s.num_bits, s.symmetric, False)


def test_mse_calibration_on_few_values_uses_them_all():
    model = Net()
    layers = find_layers(model)
    batches = _batches()
    rec = Recorder({"conv": model.conv})
    qs = calibrate_activation_quantizers(model, layers, {"conv": ActivationScheme(3, False, True)}, batches)
    rec.remove()
    x = torch.cat([t.reshape(-1) for t in rec.inputs["conv"]])
    assert qs["conv"] == ActivationQuantizer.fit(x, 3, False, True)


def test_attached_quantizers_change_each_layer_input_by_the_quantization_error_only():
    model = Net().eval()
    layers = find_layers(model)
    batches = _batches()
    schemes = {n: ActivationScheme(4, symmetric=False, mse=True) for n in layers}
    qs = calibrate_activation_quantizers(model, layers, schemes, batches)
    x = batches[0]
    with torch.no_grad():
        dense = model(x)
        handle = attach(model, layers, qs)
        rec = Recorder({n: i.module for n, i in layers.items()})
        simulated = model(x)
        rec.remove()
        # The same network written out by hand with the inputs quantize-dequantized.
        h = F.conv2d(qs["conv"](x), model.conv.weight, model.conv.bias, padding=1)
        by_hand = F.linear(qs["fc"](torch.relu(h).flatten(1)), model.fc.weight, model.fc.bias)
        assert torch.allclose(simulated, by_hand, atol=1e-6)
        assert torch.equal(rec.inputs["conv"][0], qs["conv"](x))
        for name, q in qs.items():
            seen = rec.inputs[name][0]
            assert torch.equal(q(seen), seen)  # what the layer computes with is on its grid
        assert not torch.allclose(simulated, dense)
        handle.remove()
        assert not handle.active
        assert torch.equal(model(x), dense)
        assert not model.conv._forward_pre_hooks and not model.fc._forward_pre_hooks


def test_attach_by_name_keyword_input_and_context_manager():
    lin = nn.Linear(4, 3)
    model = nn.Sequential(lin)
    q = ActivationQuantizer.fit(torch.linspace(-1, 1, 50), 2, symmetric=True)
    x = torch.randn(5, 4, generator=_gen())
    with torch.no_grad(), attach(model, None, {"0": q}):
        assert torch.equal(model(x), F.linear(q(x), lin.weight, lin.bias))
        assert torch.equal(lin(input=x), F.linear(q(x), lin.weight, lin.bias))
    assert not lin._forward_pre_hooks
    with pytest.raises(ValueError, match="layer 1"):
        attach(model, None, {"1": q})
    with pytest.raises(ValueError, match="layer 0: is not a module of the model"):
        attach(model, {"0": nn.Linear(4, 3)}, {"0": q})


def test_non_finite_activation_is_a_value_error_naming_the_layer():
    model = Net()
    layers = find_layers(model)
    with torch.no_grad():
        model.conv.bias[2] = float("inf")
    with pytest.raises(ValueError, match="layer fc: non-finite"):
        calibrate_activation_quantizers(model, layers, {"fc": ActivationScheme(8)}, _batches())
    assert not model.fc._forward_pre_hooks


def test_calibration_rejects_unknown_layers_and_missing_calls():
    model = Net()
    layers = find_layers(model)
    with pytest.raises(ValueError, match="layer head"):
        calibrate_activation_quantizers(model, layers, {"head": ActivationScheme(8)}, _batches())

    class Skips(Net):
        def forward(self, x):
            return self.conv(x)

    m = Skips()
    with pytest.raises(ValueError, match="layer fc: received no inputs"):
        calibrate_activation_quantizers(m, find_layers(m), {"fc": ActivationScheme(8)}, _batches())
