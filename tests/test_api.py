import copy
import sys

import pytest
import torch
from torch import nn

from obcompress.api import compress
from obcompress.model import collect_hessians, find_layers, weight_groups
from obcompress.solvers import layer_loss


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, groups=2)  # 2 groups of 4 x 36
        self.fc1 = nn.Linear(128, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def _setup(seed=0, n=96):
    torch.manual_seed(seed)
    model = Toy()
    data = [(torch.randn(32, 3, 6, 6), torch.zeros(32)) for _ in range(n // 32)]
    return model, data


def _dense_hessians(model, data, names):
    layers = {k: v for k, v in find_layers(model).items() if k in names}
    return layers, collect_hessians(model, layers, [x for x, _ in data])


def _measured_loss(dense_info, new_model, name, H):
    Wd = weight_groups(dense_info)
    Wn = weight_groups(find_layers(new_model)[name])
    return sum(layer_loss(Wd[g], Wn[g], H[g]) for g in range(Wd.shape[0]))


@pytest.mark.parametrize(
    "recipe",
    [
        {"solver": "exact", "quantization": {"num_bits": 4}},
        {"solver": "exact", "sparsity": {"sparsity": 0.5}},
        {"solver": "exact", "ignore": ["conv1"], "sparsity": {"mask_structure": "2:4"}, "quantization": {"num_bits": 4}},
        {"solver": "gptq", "quantization": {"num_bits": 3, "act_order": True}},
        {"solver": "sparsegpt", "sparsity": {"sparsity": 0.5}, "quantization": {"num_bits": 4}},
        {"solver": "magnitude", "sparsity": {"sparsity": 0.5}, "layer_loss": True},
        {"solver": "rtn", "quantization": {"num_bits": 8, "symmetric": False}, "layer_loss": True},
        {"solver": "best", "quantization": {"num_bits": 3}},
    ],
)
def test_reported_loss_is_the_measured_layer_loss(recipe):
    model, data = _setup()
    dense = copy.deepcopy(model)
    result = compress(model, recipe, data, num_calibration_samples=96, progress=False)
    names = [r.name for r in result.layers]
    layers, hessians = _dense_hessians(dense, data, names)
    assert names and result.calibration_samples == 96
    for r in result.layers:
        measured = _measured_loss(layers[r.name], model, r.name, hessians[r.name])
        assert r.loss == pytest.approx(measured, rel=1e-4, abs=1e-9), r.name
        # What an artifact stores: every weight on its group's recorded grid, zeros where masked.
        state = result.states[r.name]
        W = weight_groups(find_layers(model)[r.name])
        for g, grid in enumerate(state.grids):
            if grid is not None:
                assert torch.equal(grid.quantize(W[g]), W[g]), r.name
        if state.mask is not None:
            assert (W[~state.mask] == 0).all()
            assert r.sparsity == pytest.approx(1 - state.mask.float().mean().item())
    assert "total loss" in result.table()
    # every layer says which step engine its solver ran on, and the table sums it up
    engines = {r.engine for r in result.layers}
    assert engines <= {"native", "torch"} and f"solver engine {'+'.join(sorted(engines))}" in result.table()


def test_structure_of_joint_2_4_and_4_bit():
    model, data = _setup(1)
    recipe = {"ignore": ["conv1"], "sparsity": {"mask_structure": "2:4"}, "quantization": {"num_bits": 4}}
    compress(model, recipe, data, num_calibration_samples=96, progress=False)
    for name, info in find_layers(model).items():
        W = weight_groups(info)
        if name == "conv1":
            assert (W != 0).float().mean() > 0.95  # left dense
            continue
        if info.taps > 1:  # conv: groups of 4 input channels at one kernel tap
            C = info.cols // info.taps
            W = W.reshape(W.shape[0], W.shape[1], C, info.taps).transpose(2, 3)
        nonzero = (W != 0).reshape(-1, 4).sum(1)
        assert (nonzero <= 2).all(), name
        for row in W.reshape(-1, W.shape[-1] * (W.shape[-2] if W.dim() == 4 else 1)):
            assert torch.unique(row[row != 0]).numel() <= 16


def test_sequential_first_layer_equals_parallel():
    model_p, data = _setup(2)
    model_s = copy.deepcopy(model_p)
    recipe = {"quantization": {"num_bits": 3}}
    rp = compress(model_p, recipe, data, num_calibration_samples=96, progress=False)
    rs = compress(model_s, {**recipe, "calibration": "sequential"}, data, num_calibration_samples=96, progress=False)
    # The first layer sees the same inputs either way; later ones see the compressed model's.
    assert rs.layers[0].loss == pytest.approx(rp.layers[0].loss, rel=1e-6)
    assert [r.name for r in rs.layers] == [r.name for r in rp.layers]


def test_per_layer_overrides_are_applied():
    model, data = _setup(3)
    recipe = {"quantization": {"num_bits": 4}, "layers": {"fc2": {"quantization": {"num_bits": 8}},
                                                          "re:conv.*": {"sparsity": {"sparsity": 0.25}}}}
    result = compress(model, recipe, data, num_calibration_samples=96, progress=False)
    by = {r.name: r for r in result.layers}
    assert by["fc2"].bits == 8 and by["fc1"].bits == 4
    assert by["conv1"].sparsity == pytest.approx(0.25, abs=0.01) and by["fc1"].sparsity == 0


@pytest.mark.parametrize("spill", [False, True], ids=["originals in memory", "originals on disk"])
def test_failure_half_way_leaves_the_model_unchanged(monkeypatch, spill):
    import obcompress.api as api
    import obcompress.jobs as jobs

    if spill:  # what a large model's weights do: kept in a temporary directory, not in memory
        monkeypatch.setattr(api, "SPILL_BYTES", 0)
        made = []
        real_dir = api.tempfile.TemporaryDirectory

        def spy(*a, **k):
            made.append(real_dir(*a, **k))
            return made[-1]

        monkeypatch.setattr(api.tempfile, "TemporaryDirectory", spy)

    model, data = _setup(5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    real = jobs.solve_layer
    calls = []

    def failing(W, H, scheme, columns_last):
        calls.append(1)
        if len(calls) == 3:
            raise ValueError("H is not positive definite even after relative dampening")
        return real(W, H, scheme, columns_last)

    monkeypatch.setattr(jobs, "solve_layer", failing)
    with pytest.raises(ValueError, match="layer conv2"):
        compress(model, {"quantization": {"num_bits": 4}}, data, num_calibration_samples=96, progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    if spill:
        import os

        assert len(made) == 1 and not os.path.exists(made[0].name)  # used, then removed


def test_bad_input_names_the_problem():
    model, data = _setup(4)
    with pytest.raises(ValueError, match="layer conv1"):
        compress(model, {"sparsity": {"mask_structure": "2:4"}}, data, progress=False)  # 27 columns
    with pytest.raises(ValueError, match="quantisation"):
        compress(model, {"quantisation": {"num_bits": 4}}, data, progress=False)
    with pytest.raises(ValueError, match="nothing|no layer|match"):
        compress(model, {"targets": ["Conv1d"], "quantization": {"num_bits": 4}}, data, progress=False)
    with pytest.raises(ValueError, match="fc9"):
        compress(model, {"quantization": {"num_bits": 4}, "layers": {"fc9": {"quantization": {"num_bits": 8}}}},
                 data, progress=False)
    with pytest.raises(ValueError, match="empty|no calibration"):
        compress(model, {"quantization": {"num_bits": 4}}, [], progress=False)
    bad = [(torch.full((8, 3, 6, 6), float("nan")), None)]
    with pytest.raises(ValueError, match="layer conv1: non-finite"):
        compress(model, {"quantization": {"num_bits": 4}}, bad, progress=False)
    # Nothing was written by the failed calls.
    fresh, _ = _setup(4)
    for (n1, p1), (_, p2) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(p1, p2), n1


def test_digits_cnn_obq_4_bit_keeps_accuracy(tmp_path, monkeypatch):
    monkeypatch.setenv("OBCOMPRESS_CACHE", str(tmp_path))
    from obcompress.zoo.digits import calibration_inputs, digits_cnn, evaluate, load_digits_data

    data = load_digits_data()
    model = digits_cnn(pretrained=True, data=data)
    dense = evaluate(model, data.X_test, data.y_test)
    batches = calibration_inputs(512, data).split(128)
    compress(model, {"quantization": {"num_bits": 4}}, batches, num_calibration_samples=512, progress=False)
    assert evaluate(model, data.X_test, data.y_test) >= dense - 0.01


class ToyBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 36, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def test_weights_and_activations_save_and_load_identically(tmp_path):
    from obcompress.formats import load, save

    torch.manual_seed(6)
    model = ToyBN().eval()
    model.bn.running_mean.uniform_(-0.5, 0.5)
    data = [torch.randn(32, 3, 6, 6) for _ in range(3)]
    recipe = {"quantization": {"num_bits": 4, "activations": {"num_bits": 8}},
              "corrections": {"statistics_correction": True}}
    result = compress(model, recipe, data, num_calibration_samples=96, progress=False)
    assert set(result.activation_quantizers) == {"conv", "fc"}
    assert "statistics_correction" in result.corrections
    x = torch.randn(5, 3, 6, 6)
    with torch.no_grad():
        y = model(x)
    save(model, result, tmp_path / "art")
    fresh = ToyBN().eval()
    load(tmp_path / "art", fresh)
    with torch.no_grad():
        assert torch.equal(fresh(x), y)  # weights, corrected BN and the input quantizers
    result.activation_hooks.remove()
    with torch.no_grad():
        assert not torch.equal(model(x), y)  # the 8-bit inputs really were part of the output


def test_bn_reestimation_needs_batchnorm():
    model, data = _setup(7)
    with pytest.raises(ValueError, match="no BatchNorm"):
        compress(model, {"quantization": {"num_bits": 4}, "corrections": {"bn_reestimation": True}}, data,
                 num_calibration_samples=96, progress=False)


def test_best_keeps_the_lower_loss_of_obq_and_gptq_act_order():
    model, data = _setup(8)
    losses = {}
    for solver, extra in (("exact", {}), ("gptq", {"act_order": True}), ("best", {})):
        m = copy.deepcopy(model)
        r = compress(m, {"solver": solver, "quantization": {"num_bits": 3, **extra}}, data,
                     num_calibration_samples=96, progress=False)
        losses[solver] = {x.name: x.loss for x in r.layers}
    for name in losses["best"]:
        assert losses["best"][name] == pytest.approx(min(losses["exact"][name], losses["gptq"][name]), rel=1e-6)


def test_a_layer_the_mask_structure_does_not_fit_names_the_fixes():
    model, data = _setup()  # conv1 has 3 x 3 x 3 = 27 columns: no 2:4 groups
    with pytest.raises(ValueError, match=r"layer conv1: .*27 columns are not divisible by 4.*ignore: \['conv1'\]"
                                         r".*sparsity: null.*unfit_layers: dense"):
        compress(model, {"sparsity": {"mask_structure": "2:4"}}, data, progress=False)


def test_an_override_that_leaves_its_layer_unpruned_works_in_a_pruning_only_recipe():
    model, data = _setup()
    before = model.conv1.weight.detach().clone()
    r = compress(model, {"sparsity": {"mask_structure": "2:4"}, "layers": {"conv1": {"sparsity": None}}},
                 data, progress=False)
    assert [x.name for x in r.layers] == ["conv2", "fc1", "fc2"]
    assert torch.equal(model.conv1.weight, before)
    with pytest.raises(ValueError, match=r"overrides match no selected layer: \['conv9'\]"):
        compress(model, {"sparsity": {"mask_structure": "2:4"}, "layers": {"conv9": {"sparsity": None}}}, data,
                 progress=False)


def test_unfit_layers_dense_keeps_such_layers_unpruned_and_lists_them(tmp_path):
    from obcompress.formats import save

    model, data = _setup()
    before = model.conv1.weight.detach().clone()
    r = compress(model, {"sparsity": {"mask_structure": "2:4", "unfit_layers": "dense"},
                         "quantization": {"num_bits": 4}}, data, progress=False)
    assert set(r.unfit) == {"conv1"} and "not divisible by 4" in r.unfit["conv1"]
    conv1 = next(x for x in r.layers if x.name == "conv1")
    assert conv1.sparsity == 0 and conv1.bits == 4  # still quantized
    assert not torch.equal(model.conv1.weight, before)
    assert all(x.sparsity == pytest.approx(0.5) for x in r.layers if x.name != "conv1")
    assert "not pruned (unfit_layers: dense): conv1" in r.table()
    save(model, r, tmp_path / "art")
    import json

    assert "conv1" in json.loads((tmp_path / "art" / "report.json").read_text())["unfit"]


def test_progress_bars_stay_out_of_logs(capsys):
    # stderr captured by pytest is not a terminal: a bar there would only clutter the log.
    model, data = _setup()
    compress(model, {"solver": "rtn", "quantization": {"num_bits": 8}}, data, progress=True)
    assert "compress" not in capsys.readouterr().err


def test_magnitude_and_rtn_collect_no_hessian_unless_layer_loss(monkeypatch):
    import obcompress.api as api

    model, data = _setup()
    asked = []
    real = api.collect_hessians

    def spy(model, layers, batches, **kw):
        asked.append(sorted(layers))
        return real(model, layers, batches, **kw)

    monkeypatch.setattr(api, "collect_hessians", spy)
    recipe = {"solver": "rtn", "quantization": {"num_bits": 4}, "layers": {"fc1": {"solver": "exact"}}}
    result = compress(copy.deepcopy(model), recipe, data, num_calibration_samples=96, progress=False)
    assert asked == [["fc1"]]  # only the exact layer needs H
    assert [r.loss is None for r in result.layers] == [True, True, False, True]
    table = result.table()
    assert "over the 1 layers with a Hessian" in table and "set layer_loss: true" in table
    assert result.total_loss != result.total_loss  # NaN: not every loss was measured
    asked.clear()
    result = compress(copy.deepcopy(model), dict(recipe, layer_loss=True), data, num_calibration_samples=96,
                      progress=False)
    assert asked == [["conv1", "conv2", "fc1", "fc2"]] and all(r.loss is not None for r in result.layers)


def test_long_exact_solves_are_announced_with_the_alternatives_and_show_an_eta(monkeypatch, capsys):
    import obcompress.api as api

    monkeypatch.setattr(api, "LONG_SOLVE_SECONDS", 0.0)
    monkeypatch.setattr(api, "_wide", lambda shape: True)
    # The ETA lives on the progress bar, which shows on a terminal only: stderr plays one here.
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    model, data = _setup()
    compress(model, {"solver": "exact", "sparsity": {"sparsity": 0.5}, "targets": ["fc1"]}, data,
             num_calibration_samples=96, progress=True)
    err = capsys.readouterr().err
    assert "layer fc1: exact ExactOBS on 16x128 takes about" in err
    assert "solver sparsegpt" in err and "--executor ray" in err
    assert "fc1: rows 16/16, ETA 0 s" in err


class _Block(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.up, self.gate, self.down = nn.Linear(d, 2 * d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.down(torch.relu(self.gate(x)) * self.up(x))


class _Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(5, 8)
        self.blocks = nn.ModuleList(_Block() for _ in range(3))

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = b(x)
        return x


@pytest.mark.parametrize("engine", ["native", "torch"])
def test_block_sequential_losses_are_measured_on_the_inputs_of_the_blocks_compressed_before(engine, monkeypatch):
    """Each layer's reported loss is its loss under the H of the model whose earlier blocks are
    compressed and whose own block is dense (computed here by hooks on such a model), on the CPU
    asked for explicitly, with the fused kernel and with the torch step."""
    if engine == "torch":
        monkeypatch.setenv("OBCOMPRESS_NATIVE", "0")
    torch.manual_seed(0)
    model = _Stack()
    dense = copy.deepcopy(model)
    data = [torch.randn(4, 6, 5) for _ in range(3)]
    result = compress(model, {"solver": "exact", "quantization": {"num_bits": 3}, "calibration": "sequential",
                              "device": "cpu"}, data, num_calibration_samples=12, progress=False)
    assert result.calibration["path"] == "blocks" and result.calibration["blocks"] == 3
    for i in range(3):
        probe = copy.deepcopy(dense)
        probe.stem.load_state_dict(model.stem.state_dict())
        for b in range(i):
            probe.blocks[b].load_state_dict(model.blocks[b].state_dict())
        names = [f"blocks.{i}.{n}" for n in ("up", "gate", "down")]
        _, H = _dense_hessians(probe, [(x, None) for x in data], names)
        for n in names:
            r = next(r for r in result.layers if r.name == n)
            measured = _measured_loss(find_layers(dense)[n], model, n, H[n])
            assert r.loss == pytest.approx(measured, rel=1e-4, abs=1e-9), n
