import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from obcompress.model import HessianHooks, calibration_batches, collect_hessians, find_layers, run_model


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _hand_hessian(X):
    """2 X X^T / N with samples as rows of X (N, cols), in float64."""
    X = X.double()
    return 2 * X.t() @ X / X.shape[0]


def _hand_conv_hessians(x, conv):
    """Per-group Hessians of a zero-padded Conv2d input, unfolded here with F.unfold group by group."""
    cpg = x.shape[1] // conv.groups
    out = []
    for g in range(conv.groups):
        cols = F.unfold(x[:, g * cpg : (g + 1) * cpg], conv.kernel_size, conv.dilation, conv.padding, conv.stride)
        out.append(_hand_hessian(cols.transpose(1, 2).reshape(-1, cols.shape[1])))
    return torch.stack(out)


class Tokens(nn.Module):
    """Linear layers on 3-D (B, T, C) inputs; Dropout shows whether the pass ran in eval mode."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x, scale=None):
        h = self.fc1(x)
        if scale is not None:
            h = h * scale[:, None, None]
        return self.fc2(self.drop(torch.relu(h)))


class Convs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.grouped = nn.Conv2d(6, 4, 3, stride=2, padding=1, dilation=1, groups=2)

    def forward(self, x):
        return self.grouped(torch.relu(self.conv(x)))


class Recorder:
    """Records the inputs each module receives (the test's independent view of the activations)."""

    def __init__(self, modules):
        self.inputs = {name: [] for name in modules}
        self.handles = [
            m.register_forward_pre_hook(lambda mod, args, name=name: self.inputs[name].append(args[0].detach().clone()))
            for name, m in modules.items()
        ]

    def close(self):
        for h in self.handles:
            h.remove()


# ---------------------------------------------------------------- calibration_batches


def test_calibration_batches_counts_and_slices_without_reading_further():
    data = torch.randn(20, 3, generator=_gen())
    read = []

    def batches():
        for i in range(0, 20, 4):
            read.append(i)
            yield data[i : i + 4]

    out = calibration_batches(batches(), 10)
    assert [b.shape[0] for b in out] == [4, 4, 2]
    assert torch.equal(torch.cat(out), data[:10])
    assert read == [0, 4, 8]  # stops at the batch that completes the count
    assert [b.shape[0] for b in calibration_batches(batches(), 8)] == [4, 4]


def test_calibration_batches_pairs_dicts_and_dataloaders():
    x, y = torch.randn(7, 2, 3, generator=_gen(1)), torch.arange(7)
    loader = DataLoader(TensorDataset(x, y), batch_size=3)
    out = calibration_batches(loader, 5)
    assert [b.shape for b in out] == [(3, 2, 3), (2, 2, 3)] and torch.equal(torch.cat(out), x[:5])
    out = calibration_batches([[x[:4], y[:4]], (x[4:], y[4:])], 6)
    assert torch.equal(torch.cat(out), x[:6])
    # A torch Dataset yields single samples: it is batched before counting.
    out = calibration_batches(TensorDataset(x, y), 6)
    assert torch.equal(torch.cat(out), x[:6])
    dicts = [{"input_ids": torch.arange(8).reshape(4, 2), "mask": torch.ones(4, 2), "labels": torch.zeros(4), "tag": "a"}]
    (b,) = calibration_batches(dicts, 3)
    assert set(b) == {"input_ids", "mask", "tag"}  # labels dropped, non-tensors kept
    assert torch.equal(b["input_ids"], torch.arange(6).reshape(3, 2)) and b["mask"].shape == (3, 2)


def test_calibration_batches_transform_fn():
    x = torch.randn(6, 4, generator=_gen(2))
    out = calibration_batches([(x[:3], 0), (x[3:], 1)], 5, transform_fn=lambda b: (b[0] * 2, b[1]))
    assert isinstance(out[1], tuple) and out[1][0].shape == (2, 4) and out[1][1] == 1
    assert torch.equal(torch.cat([b[0] for b in out]), 2 * x[:5])


def test_calibration_batches_bad_input():
    with pytest.raises(ValueError, match="empty"):
        calibration_batches([], 4)
    with pytest.raises(ValueError, match="empty"):
        calibration_batches(DataLoader(TensorDataset(torch.zeros(0, 2)), batch_size=2), 4)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="positive integer"):
            calibration_batches([torch.zeros(2, 2)], bad)
    with pytest.raises(ValueError, match="type str"):
        calibration_batches(["text"], 2)
    with pytest.raises(ValueError, match="iterable"):
        calibration_batches(3, 2)
    with pytest.raises(ValueError, match="cannot count"):
        calibration_batches([1, 2], 2, transform_fn=lambda b: {"n": b})


def test_calibration_batches_too_few_samples_warns_and_uses_all():
    x = torch.randn(5, 2)
    with pytest.warns(UserWarning, match="asked for 8 .* only 5"):
        out = calibration_batches([x[:3], x[3:]], 8)
    assert torch.equal(torch.cat(out), x)


def test_run_model_dispatch():
    model = Tokens().eval()
    x = torch.randn(2, 3, 6)
    s = torch.tensor([1.0, 2.0])
    torch.testing.assert_close(run_model(model, x), model(x))
    torch.testing.assert_close(run_model(model, (x, s)), model(x, s))
    torch.testing.assert_close(run_model(model, {"x": x, "scale": s}), model(x, scale=s))


# ---------------------------------------------------------------- Hessians


def test_collect_hessians_linear_3d_from_dataloader_pairs_matches_hand_computation():
    torch.manual_seed(0)
    model = Tokens().train()
    model.fc1.train(False)  # a mixed train/eval state must come back as it was
    x = torch.randn(7, 4, 6, generator=_gen(3))
    loader = DataLoader(TensorDataset(x, torch.zeros(7)), batch_size=3)
    batches = calibration_batches(loader, 5)
    layers = find_layers(model)
    H = collect_hessians(model, layers, batches)
    assert model.training and model.drop.training and not model.fc1.training

    model.eval()
    rec = Recorder({"fc2": model.fc2})
    with torch.no_grad():
        model(x[:5])
    rec.close()
    assert set(H) == {"fc1", "fc2"}
    assert H["fc1"].shape == (1, 6, 6) and H["fc2"].shape == (1, 5, 5) and H["fc1"].dtype == torch.float64
    # The first layer sees the data itself: 5 samples x 4 tokens, every token a sample.
    torch.testing.assert_close(H["fc1"][0], _hand_hessian(x[:5].reshape(-1, 6)), rtol=1e-12, atol=1e-12)
    # Dropout off (eval mode) is what makes these the inputs fc2 saw.
    torch.testing.assert_close(H["fc2"][0], _hand_hessian(rec.inputs["fc2"][0].reshape(-1, 5)), rtol=1e-12, atol=1e-12)


def test_collect_hessians_from_dict_batches():
    torch.manual_seed(1)
    model = Tokens()
    x, s = torch.randn(6, 2, 6, generator=_gen(4)), torch.rand(6, generator=_gen(5)) + 0.5
    data = [{"x": x[i : i + 2], "scale": s[i : i + 2], "labels": torch.zeros(2)} for i in range(0, 6, 2)]
    batches = calibration_batches(data, 5)  # labels dropped: Tokens.forward would reject them
    rec = Recorder({"fc2": model.fc2})
    H = collect_hessians(model, find_layers(model, targets=["fc2"]), batches)
    rec.close()
    assert list(H) == ["fc2"]
    X = torch.cat([a.reshape(-1, 5) for a in rec.inputs["fc2"]])
    assert X.shape[0] == 5 * 2
    h = model.fc1(x[:5]) * s[:5, None, None]
    torch.testing.assert_close(X, torch.relu(h).reshape(-1, 5).detach())
    torch.testing.assert_close(H["fc2"][0], _hand_hessian(X), rtol=1e-12, atol=1e-12)


def test_collect_hessians_grouped_conv2d_matches_hand_unfold():
    torch.manual_seed(2)
    model = Convs()
    x = torch.randn(5, 4, 7, 6, generator=_gen(6))
    batches = calibration_batches(DataLoader(TensorDataset(x, torch.zeros(5)), batch_size=2), 5)
    rec = Recorder({"grouped": model.grouped})
    H = collect_hessians(model, find_layers(model), batches)
    rec.close()
    assert H["conv"].shape == (1, 36, 36) and H["grouped"].shape == (2, 27, 27)
    torch.testing.assert_close(H["conv"], _hand_conv_hessians(x, model.conv), rtol=1e-12, atol=1e-12)
    inputs = torch.cat(rec.inputs["grouped"])
    torch.testing.assert_close(H["grouped"], _hand_conv_hessians(inputs, model.grouped), rtol=1e-12, atol=1e-12)


def test_hessian_hooks_accumulate_every_call_and_are_removed():
    model = Tokens().eval()
    layers = find_layers(model, targets=["fc1"])
    x1, x2 = torch.randn(2, 3, 6), torch.randn(4, 6)  # 3-D and 2-D inputs of the same layer
    with HessianHooks(layers) as hooks:
        with torch.no_grad():
            model(x1)
            model.fc1(x2)
        assert hooks.nsamples() == {"fc1": 10}
    assert not model.fc1._forward_pre_hooks
    model(x1)  # after exit nothing is added
    assert hooks.nsamples() == {"fc1": 10}
    expected = _hand_hessian(torch.cat([x1.reshape(-1, 6), x2]))
    torch.testing.assert_close(hooks.hessians()["fc1"][0], expected, rtol=1e-12, atol=1e-12)


def test_non_finite_activations_name_the_layer_and_leave_no_hooks():
    model = Tokens()
    with torch.no_grad():
        model.fc1.weight[0, 0] = float("inf")
    x = torch.randn(2, 3, 6)
    with pytest.raises(ValueError, match="layer fc2: non-finite activations"):
        collect_hessians(model, find_layers(model), [x])
    assert not model.fc1._forward_pre_hooks and not model.fc2._forward_pre_hooks
    x[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="layer fc1: non-finite activations"):
        fresh = Tokens()
        collect_hessians(fresh, find_layers(fresh), [x])


def test_hessian_errors():
    model = Tokens()
    with pytest.raises(ValueError, match="no calibration batches"):
        collect_hessians(model, find_layers(model), [])
    with pytest.raises(ValueError, match="layer fc2: received no inputs"):
        with HessianHooks(find_layers(model)) as hooks:
            model.fc1(torch.randn(2, 6))
        hooks.hessians()
    with pytest.raises(ValueError, match="non-empty dict"):
        HessianHooks({})


class Conv1D(nn.Module):
    """Stand-in for transformers' Conv1D (weight stored (in, out), .nf = out)."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf))

    def forward(self, x):
        return x @ self.weight


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 4, 3, stride=2, padding="valid", dilation=2)
        self.dw = nn.Conv2d(4, 4, 3, groups=4, padding=1, padding_mode="reflect")
        self.same = nn.Conv2d(4, 2, (3, 2), padding="same", padding_mode="circular")
        self.hf = Conv1D(3, 2)

    def forward(self, x):  # x: (B, 3, 19) -> c1 -> (B, 4, 8) -> (B, 4, 2, 4)
        y = self.c1(x).reshape(x.shape[0], 4, 2, 4)
        y = self.same(self.dw(y))
        return self.hf(y.flatten(2).transpose(1, 2))


def test_hooks_unfold_every_conv_like_the_layer_itself():
    # For each layer, the Hessian must be that of the unfolded samples that reproduce its output
    # (checked in test_layers), here built from the inputs the layer really received.
    from obcompress.solvers.hessian import unfold_conv_input

    torch.manual_seed(3)
    model = Mixed()
    x = torch.randn(3, 3, 19, generator=_gen(7))
    layers = find_layers(model)
    rec = Recorder({n: i.module for n, i in layers.items()})
    H = collect_hessians(model, layers, [x[:2], x[2:]])
    rec.close()
    for name, info in layers.items():
        inp = torch.cat(rec.inputs[name])
        m = info.module
        if info.kind == "conv1d_hf":
            X = inp.reshape(1, -1, info.cols)
        else:
            X = unfold_conv_input(inp, m.kernel_size, m.stride, m.padding, m.dilation, m.groups, m.padding_mode)
        expected = torch.stack([_hand_hessian(Xg) for Xg in X])
        assert H[name].shape == (info.groups, info.cols, info.cols)
        torch.testing.assert_close(H[name], expected, rtol=1e-12, atol=1e-12, msg=name)


def test_unbatched_conv_input_counts_as_one_image():
    conv = nn.Conv2d(2, 3, 3, padding=1)
    layers = find_layers(nn.Sequential(conv))
    x = torch.randn(2, 5, 5)
    with HessianHooks(layers) as hooks, torch.no_grad():
        conv(x)
    torch.testing.assert_close(hooks.hessians()["0"], _hand_conv_hessians(x[None], conv), rtol=1e-12, atol=1e-12)


class _Counting(nn.Module):
    """fc1 runs twice per forward (shared weights), fc2 once; counts the forwards of the tail."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.tail = nn.Linear(6, 6), nn.Linear(6, 4), nn.Linear(4, 3)
        self.tail_calls = 0
        self.tail.register_forward_pre_hook(lambda m, a: setattr(self, "tail_calls", self.tail_calls + 1))

    def forward(self, x):
        return self.tail(self.fc2(torch.relu(self.fc1(torch.relu(self.fc1(x))))))


def test_stop_early_gives_the_same_hessians_and_skips_the_rest_of_the_model():
    model = _Counting().eval()
    batches = [torch.randn(5, 6, generator=_gen(i)) for i in range(4)]
    for targets in (["fc1"], ["fc1", "fc2"]):
        layers = find_layers(model, targets=targets)
        full = collect_hessians(model, layers, batches)
        model.tail_calls = 0
        early = collect_hessians(model, layers, batches, stop_early=True)
        for n in targets:
            assert torch.equal(early[n], full[n]), n
        # Only the first batch reaches the tail: the others stop after the last call of the hooked layers.
        assert model.tail_calls == 1
    assert not model.fc1._forward_pre_hooks


def test_stop_early_refuses_data_dependent_calls():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(x) if x.shape[0] > 1 else x

    model = Branchy().eval()
    layers = find_layers(model)
    with pytest.raises(ValueError, match="fewer times than on the first batch"):
        collect_hessians(model, layers, [torch.randn(2, 3), torch.randn(1, 3)], stop_early=True)
    assert not model.fc._forward_pre_hooks


def test_float32_data_into_a_float64_model_is_cast_with_a_warning():
    from obcompress.api import compress

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    data = [torch.randn(16, 12) for _ in range(2)]  # float32
    with pytest.warns(UserWarning, match="inputs are float32, the model's weights float64: casting"):
        r = compress(model, {"solver": "gptq", "quantization": {"num_bits": 4}}, data, progress=False)
    assert [x.name for x in r.layers] == ["0", "2"] and model[0].weight.dtype == torch.float64
    # Integer inputs (token ids) are never cast.
    emb = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 4)).double()
    ids = [torch.randint(0, 10, (4, 5))]
    compress(emb, {"solver": "rtn", "quantization": {"num_bits": 8}}, ids, progress=False)


def test_data_left_unused_is_announced():
    batches = [torch.randn(32, 4) for _ in range(4)]  # 128 samples
    with pytest.warns(UserWarning, match=r"using 64 calibration samples; the data holds more \(at least 32"):
        assert len(calibration_batches(batches, 64)) == 2
    with pytest.warns(UserWarning, match=r"using 48 calibration samples; the data holds more \(at least 16"):
        calibration_batches(batches, 48)  # the second batch is cut
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(calibration_batches(batches, 128)) == 4  # all of it: nothing to say
        calibration_batches(iter(batches), 128)
