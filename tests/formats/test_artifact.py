import json

import pytest
import torch
from torch import nn

from obcompress.api import compress
from obcompress.formats import artifact_size, fp32_size, load, read_config, save
from obcompress.formats import artifact as artifact_mod
from obcompress.recipe import Recipe


class Toy(nn.Module):
    """Linear + grouped Conv2d + BatchNorm: every layout the artifact has to map back."""

    def __init__(self, hidden=64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, groups=4)  # 4 groups of 4 rows x 36 cols
        self.bn2 = nn.BatchNorm2d(16)
        self.fc1 = nn.Linear(16 * 4 * 4, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = nn.functional.avg_pool2d(x, 2).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


def _trained_toy(seed=0):
    torch.manual_seed(seed)
    model = Toy()
    data = [(torch.randn(32, 3, 8, 8), torch.zeros(32)) for _ in range(3)]
    # Running statistics away from their defaults, so that a skeleton's fresh BatchNorm differs.
    model.train()
    with torch.no_grad():
        for x, _ in data:
            model(x * 2 + 1)
    model.eval()
    return model, data


def _skeleton(seed=123, cls=Toy, **kw):
    torch.manual_seed(seed)
    return cls(**kw).eval()


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, snap):
    sd = model.state_dict()
    return sd.keys() == snap.keys() and all(torch.equal(sd[k], snap[k]) for k in snap)


RECIPES = {
    "4bit": {"solver": "exact", "quantization": {"num_bits": 4}},
    "3bit-group": {"solver": "exact", "quantization": {"num_bits": 3, "strategy": "group", "group_size": 8}},
    "2:4+4bit": {"solver": "exact", "ignore": ["conv1"], "sparsity": {"mask_structure": "2:4"},
                 "quantization": {"num_bits": 4}},
    "50%-unquantized": {"solver": "exact", "sparsity": {"sparsity": 0.5}},
    "gptq-act-order-groups": {"solver": "gptq", "quantization": {"num_bits": 4, "strategy": "group", "group_size": 16,
                                                                 "act_order": True}},
    "rtn-2bit-asym-tensor": {"solver": "rtn", "quantization": {"num_bits": 2, "symmetric": False, "strategy": "tensor"}},
    "rtn-7bit-asym": {"solver": "rtn", "quantization": {"num_bits": 7, "symmetric": False}},
    "10%-magnitude+5bit": {"solver": "magnitude", "sparsity": {"sparsity": 0.1}, "quantization": {"num_bits": 5}},
}


@pytest.mark.parametrize("key", list(RECIPES))
def test_round_trip_gives_identical_outputs(tmp_path, key):
    model, data = _trained_toy()
    result = compress(model, RECIPES[key], data, num_calibration_samples=96, progress=False)
    x = torch.randn(16, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
    config = save(model, result, tmp_path / "art")

    fresh = _skeleton()
    with torch.no_grad():
        assert not torch.equal(fresh(x), expected)
    assert load(tmp_path / "art", fresh) is fresh
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)
    sd = model.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in fresh.state_dict().items())

    # The recipe and report travel with the weights, and the report's size is the real one.
    assert Recipe.from_yaml(str(tmp_path / "art" / "recipe.yaml")) == result.recipe
    report = json.loads((tmp_path / "art" / "report.json").read_text())
    assert report["layers"] == result.report
    assert report["artifact_bytes"] == artifact_size(tmp_path / "art")
    assert report["fp32_bytes"] == fp32_size(model)
    for name, entry in config["layers"].items():
        stored = [r for r in result.layers if r.name == name][0]
        assert entry["quantization"] is None if stored.bits is None else entry["quantization"]["bits"] == stored.bits
        assert entry["sparsity"] == pytest.approx(stored.sparsity)


def test_storage_is_the_smaller_of_bitmask_plus_kept_and_dense(tmp_path):
    model, data = _trained_toy(1)
    recipe = {"solver": "magnitude", "sparsity": {"sparsity": 0.5},
              "layers": {"fc1": {"quantization": {"num_bits": 4}, "sparsity": {"sparsity": 0.1}},
                         "fc2": {"solver": "rtn", "quantization": {"num_bits": 4}, "sparsity": None},
                         "conv2": {"sparsity": {"mask_structure": "2:4"}, "quantization": {"num_bits": 4}}}}
    result = compress(model, recipe, data, num_calibration_samples=96, progress=False)
    layers = save(model, result, tmp_path / "a")["layers"]
    n = {name: e["groups"] * e["rows"] * e["cols"] for name, e in layers.items()}
    # 50 % unquantized: 1 bit of mask + half the floats beats all the floats.
    assert layers["conv1"]["storage"] == "bitmask+values"
    assert layers["conv1"]["bytes"]["values"] == 4 * n["conv1"] // 2
    # 2:4 at 4 bits: 1 + 2 bits per weight beat 4.
    assert layers["conv2"]["storage"] == "bitmask+codes"
    assert layers["conv2"]["bytes"]["codes"] == n["conv2"] // 4
    # 10 % pruned at 4 bits: 1 + 3.6 bits per weight lose to 4, so all codes are kept.
    assert layers["fc1"]["storage"] == "codes" and "mask" not in layers["fc1"]["bytes"]
    assert layers["fc1"]["bytes"]["codes"] == n["fc1"] // 2
    assert layers["fc2"]["storage"] == "codes"
    fresh = load(tmp_path / "a", _skeleton())
    x = torch.randn(8, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


class Wide(nn.Module):
    """Nearly all of its bytes are in two linear weights."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(512, 512)
        self.norm = nn.LayerNorm(512)
        self.fc2 = nn.Linear(512, 256)

    def forward(self, x):
        return self.fc2(torch.relu(self.norm(self.fc1(x))))


def test_2_4_plus_4_bit_artifact_is_under_a_sixth_of_fp32(tmp_path):
    torch.manual_seed(0)
    model = Wide()
    data = [torch.randn(64, 512) for _ in range(2)]
    recipe = {"solver": "sparsegpt", "sparsity": {"mask_structure": "2:4"}, "quantization": {"num_bits": 4}}
    result = compress(model, recipe, data, num_calibration_samples=128, progress=False)
    save(model, result, tmp_path / "a")
    on_disk = artifact_size(tmp_path / "a")
    fp32 = fp32_size(model)
    assert fp32 == 4 * sum(p.numel() for p in model.parameters())
    assert on_disk < fp32 / 6, (on_disk, fp32)
    x = torch.randn(4, 512)
    fresh = load(tmp_path / "a", _skeleton(cls=Wide))
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, data = _trained_toy(2)
    result = compress(model, RECIPES["2:4+4bit"], data, num_calibration_samples=96, progress=False)
    directory = tmp_path_factory.mktemp("saved") / "art"
    save(model, result, directory)
    return directory


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_refuses_truncated_weights(saved, tmp_path):
    d = _copy(saved, tmp_path / "a")
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    target = _skeleton()
    snap = _snapshot(target)
    with pytest.raises(ValueError, match="truncated"):
        load(d, target)
    assert _unchanged(target, snap)


def test_refuses_corrupted_weights(saved, tmp_path):
    d = _copy(saved, tmp_path / "a")
    w = d / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-5] ^= 0x10
    w.write_bytes(bytes(data))
    target = _skeleton()
    snap = _snapshot(target)
    with pytest.raises(ValueError, match="corrupted"):
        load(d, target)
    assert _unchanged(target, snap)


def test_refuses_unknown_format_version(saved, tmp_path):
    d = _copy(saved, tmp_path / "a")
    cfg = json.loads((d / "compression_config.json").read_text())
    cfg["format_version"] = 99
    (d / "compression_config.json").write_text(json.dumps(cfg))
    target = _skeleton()
    snap = _snapshot(target)
    with pytest.raises(ValueError, match="version 99"):
        load(d, target)
    assert _unchanged(target, snap)


def test_refuses_damaged_config(saved, tmp_path):
    d = _copy(saved, tmp_path / "a")
    text = (d / "compression_config.json").read_text()
    (d / "compression_config.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match="not valid JSON"):
        load(d, _skeleton())


class Renamed(Toy):
    def __init__(self):
        super().__init__()
        self.head = self.fc2
        del self.fc2

    def forward(self, x):  # pragma: no cover - never run
        raise AssertionError


@pytest.mark.parametrize("make", [lambda: _skeleton(hidden=32), lambda: _skeleton(cls=Renamed)],
                         ids=["shapes", "names"])
def test_refuses_another_architecture(saved, make):
    target = make()
    snap = _snapshot(target)
    with pytest.raises(ValueError, match="does not match|shape"):
        load(saved, target)
    assert _unchanged(target, snap)


def test_refuses_missing_directory_and_files(saved, tmp_path):
    target = _skeleton()
    snap = _snapshot(target)
    with pytest.raises(ValueError, match="not found"):
        load(tmp_path / "nowhere", target)
    d = _copy(saved, tmp_path / "a")
    (d / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="missing"):
        load(d, target)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not an obcompress artifact"):
        load(tmp_path / "empty", target)
    assert _unchanged(target, snap)


def test_save_is_all_or_nothing(tmp_path, monkeypatch):
    model, data = _trained_toy(3)
    result = compress(model, RECIPES["4bit"], data, num_calibration_samples=96, progress=False)
    out = tmp_path / "art"
    save(model, result, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    # A failure after the weights file is written leaves the previous artifact as it was.
    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(artifact_mod, "_report", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save(model, result, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # no temporary left behind
    monkeypatch.undo()
    # Saving over an existing artifact replaces it whole.
    (out / "stale.bin").write_bytes(b"x")
    save(model, result, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]

    # A model changed after compress() no longer matches its recorded grids: nothing is written.
    with torch.no_grad():
        model.fc1.weight[0, 0] += 1e-3
    with pytest.raises(ValueError, match="fc1.*not on the grid"):
        save(model, result, tmp_path / "other")
    assert not (tmp_path / "other").exists()

    # A directory holding something else is never replaced.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not an obcompress artifact"):
        save(model, result, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(16, 16)
        self.a = nn.Linear(16, 16, bias=False)
        self.b = nn.Linear(16, 16, bias=False)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(self.a(torch.relu(self.body(x))))


def test_tied_weights_are_stored_once_and_stay_tied(tmp_path):
    torch.manual_seed(4)
    model = Tied()
    result = compress(model, {"ignore": ["a", "b"], "quantization": {"num_bits": 4}}, [torch.randn(32, 16)],
                      num_calibration_samples=32, progress=False)
    config = save(model, result, tmp_path / "a")
    assert config["aliases"] == {"b.weight": "a.weight"}
    fresh = load(tmp_path / "a", _skeleton(cls=Tied))
    assert fresh.a.weight is fresh.b.weight
    x = torch.randn(4, 16)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    assert read_config(tmp_path / "a")["layers"]["body"]["storage"] == "codes"


def test_scales_go_to_float16_only_when_that_is_exact(tmp_path):
    from obcompress.model.layers import find_layers, set_weight_groups, weight_groups

    model, data = _trained_toy(5)
    result = compress(model, RECIPES["rtn-7bit-asym"], data, num_calibration_samples=96, progress=False)
    # Grids whose scales are float16 numbers, and weights re-rounded onto them, for fc1 only.
    info = find_layers(model)["fc1"]
    grid = result.states["fc1"].grids[0]
    grid.scale = grid.scale.half().float()
    set_weight_groups(info, grid.quantize(weight_groups(info)[0]))
    layers = save(model, result, tmp_path / "a")["layers"]
    assert layers["fc1"]["quantization"]["scale_dtype"] == "float16"
    assert layers["fc2"]["quantization"]["scale_dtype"] == "float32"
    x = torch.randn(8, 3, 8, 8)
    fresh = load(tmp_path / "a", _skeleton())
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


@pytest.mark.parametrize("damage", ["truncate", "flip", "extra file"])
def test_verify_checks_the_files_the_report_describes(saved, tmp_path, damage):
    from obcompress.formats import verify

    d = _copy(saved, tmp_path / "a")
    assert verify(d)["format"] == "obcompress-artifact"
    w = d / "model.safetensors"
    if damage == "truncate":
        w.write_bytes(w.read_bytes()[:-100])
    elif damage == "flip":
        data = bytearray(w.read_bytes())
        data[-5] ^= 0x10
        w.write_bytes(bytes(data))
    else:
        (d / "notes.txt").write_text("an extra file: the stated size is no longer the directory's")
    with pytest.raises(ValueError, match="truncated|corrupted|changed after saving"):
        verify(d)


_TO_SAVE = {}


def _save_repeatedly(args):
    directory, times = args
    model, result = _TO_SAVE["model"], _TO_SAVE["result"]
    for _ in range(times):
        save(model, result, directory)
    return True


def test_concurrent_saves_to_one_directory_all_succeed(tmp_path):
    # Four processes saving to one --out at once, 40 times each (without the lock, about one save
    # in a hundred failed on a vanished temporary name): every save succeeds, the swaps taking
    # turns, and what is left is one complete artifact and no temporary.
    import multiprocessing as mp

    from obcompress.formats import verify

    model, data = _trained_toy(0)
    _TO_SAVE.update(model=model, result=compress(model, RECIPES["4bit"], data, num_calibration_samples=32,
                                                 progress=False))
    d = tmp_path / "out"
    with mp.get_context("fork").Pool(4) as pool:
        assert all(pool.map(_save_repeatedly, [(d, 40)] * 4))
    verify(d)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
