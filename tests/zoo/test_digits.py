import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from obcompress.zoo import digits as D

BENCH_LAYERS = Path(__file__).resolve().parents[3] / "shared" / "bench" / "layers"
EXPECTED = {"conv1": (32, 9), "conv2": (64, 288), "fc1": (128, 576), "fc2": (10, 128)}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    # One cache folder for the whole session (test_demo.py uses the same one), so training runs once
    # and nothing is written to the user's own cache.
    path = tmp_path_factory.getbasetemp() / "obcompress-cache"
    path.mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OBCOMPRESS_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def data():
    return D.load_digits_data()


def test_split_is_disjoint_complete_and_deterministic(data):
    train, test = D.split_indices()
    assert len(train) == 1297 and len(test) == 500
    assert set(train.tolist()).isdisjoint(test.tolist())
    assert sorted(train.tolist() + test.tolist()) == list(range(1797))
    train2, test2 = D.split_indices()
    assert torch.equal(train, train2) and torch.equal(test, test2)

    from sklearn.datasets import load_digits

    raw = load_digits()
    assert torch.equal(data.y_train, torch.from_numpy(raw.target[train.numpy()]))
    assert torch.allclose(data.X_test.reshape(500, 64), torch.from_numpy(raw.data[test.numpy()]).float() / 16)
    again = D.load_digits_data()
    assert all(torch.equal(a, b) for a, b in zip(data, again))


def test_data_shapes_and_ranges(data):
    assert data.X_train.shape == (1297, 1, 8, 8) and data.X_test.shape == (500, 1, 8, 8)
    assert data.X_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    assert 0.0 <= float(data.X_train.min()) and float(data.X_train.max()) <= 1.0
    assert set(data.y_test.tolist()) == set(range(10))


def test_calibration_inputs_come_from_the_training_split(data):
    X = D.calibration_inputs(100, data)
    assert torch.equal(X, data.X_train[:100])
    assert torch.equal(D.calibration_inputs(1297, data), data.X_train)
    for bad in (0, 1298, 2.5, True):
        with pytest.raises(ValueError, match="calibration_inputs"):
            D.calibration_inputs(bad, data)


def _layer_shapes(model):
    return {n: tuple(m.weight.flatten(1).shape) for n, m in model.named_modules() if hasattr(m, "weight")}


def test_model_layers_match_the_bench_layers():
    model = D.digits_cnn(pretrained=False)
    assert _layer_shapes(model) == EXPECTED
    assert model(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
    if not BENCH_LAYERS.is_dir():
        pytest.skip(f"{BENCH_LAYERS} not present")
    for name, shape in EXPECTED.items():
        with safe_open(str(BENCH_LAYERS / f"digits_{name}.safetensors"), "pt") as f:
            meta = json.loads(f.metadata()["meta"])
            assert tuple(f.get_slice("W").get_shape()) == shape
        mod = getattr(model, name)
        assert list(mod.weight.shape) == meta["weight_shape"]
        if meta["type"] == "conv":
            assert list(mod.padding) == meta["padding"] and list(mod.stride) == meta["stride"]


def test_untrained_model_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = D.digits_cnn(pretrained=False)
    after = torch.rand(1)
    b = D.digits_cnn(pretrained=False)
    assert torch.equal(before, after)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_pretrained_weights_are_cached_as_safetensors_and_reload(cache, data):
    model = D.digits_cnn(pretrained=True, data=data)
    path = D.weights_path()
    assert path.parent == cache and path.suffix == ".safetensors"
    assert D.evaluate(model, data.X_test, data.y_test) >= 0.95
    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == set(model.state_dict())
        assert float(f.metadata()["test_accuracy"]) >= 0.95
    stamp = path.stat().st_mtime_ns
    again = D.digits_cnn(pretrained=True, data=data)
    assert path.stat().st_mtime_ns == stamp  # loaded, not retrained
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k])


def test_save_load_round_trip(tmp_path):
    model = D.digits_cnn(pretrained=False)
    D.save_weights(model, tmp_path / "sub" / "w.safetensors", {"note": "x"})
    loaded = D.load_weights(D.DigitsCNN(), tmp_path / "sub" / "w.safetensors")
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["w.safetensors"]  # no temp file left


def test_unreadable_cache_is_replaced(tmp_path, monkeypatch, data):
    monkeypatch.setenv("OBCOMPRESS_CACHE", str(tmp_path))
    monkeypatch.setitem(D.TRAIN_CONFIG, "epochs", 1)  # changes the cache key too: a separate file
    D.weights_path().write_bytes(b"not a safetensors file")
    with pytest.warns(UserWarning, match="unreadable"):
        model = D.digits_cnn(pretrained=True, data=data)
    assert _layer_shapes(model) == EXPECTED
    D.load_weights(D.DigitsCNN(), D.weights_path())


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("OBCOMPRESS_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
    assert D.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("OBCOMPRESS_CACHE")
    assert D.cache_dir() == tmp_path / "b" / "obcompress"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert D.cache_dir() == tmp_path / "h" / ".cache" / "obcompress"
