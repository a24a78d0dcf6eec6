import copy
import json

import pytest
import torch
from torch import nn

import obcompress.search.database as dbmod
from obcompress.api import compress
from obcompress.model import collect_hessians, find_layers, weight_groups
from obcompress.search import SearchSpace, Variant, default_space
from obcompress.search.database import build_database, load_database
from obcompress.solvers import layer_loss


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)  # depthwise: 8 groups of 1 x 9
        self.fc1 = nn.Linear(8 * 16, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.dw(torch.relu(self.conv1(x))))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


SPACE = SearchSpace((
    Variant("unstructured", 0.5), Variant("unstructured", 0.75), Variant("2:4"), Variant("block:4", 0.5),
    Variant(bits=4), Variant(bits=2), Variant("2:4", bits=4), Variant("unstructured", 0.5, 3),
), joint_min_cols=8)


def _setup(seed=0, n=64):
    torch.manual_seed(seed)
    model = Toy()
    data = [(torch.randn(32, 3, 4, 4), torch.zeros(32)) for _ in range(n // 32)]
    return model, data


def _files(d):
    return {p.name: p.read_bytes() for p in sorted((d / "layers").glob("*.safetensors"))}


def test_variants_losses_and_weights_are_what_compress_gives(tmp_path):
    model, data = _setup()
    db = build_database(model, data, tmp_path / "db", SPACE, num_calibration_samples=64, progress=False)
    assert db.names == ["conv1", "dw", "fc1", "fc2"]
    # the depthwise layer (9 columns) admits neither 2:4 nor blocks of 4
    assert {v.key for v in db.options("dw")} == {"dense", "s0.5000", "s0.7500", "w4", "w2", "s0.5000+w3"}
    assert len(db.options("fc1")) == len(SPACE.variants)
    found = find_layers(model)
    layers = {n: found[n] for n in db.names}
    H = collect_hessians(model, layers, [x for x, _ in data])
    damped_seen = set()
    for name in db.names:
        W = weight_groups(found[name])
        e = db.layers[name]
        for v in db.options(name):
            Wv = db.weights(name, v, W)
            measured = sum(layer_loss(W[g], Wv[g], H[name][g]) for g in range(W.shape[0]))
            stored = e.variants[v.key]["loss"]
            if e.variants[v.key]["damp"] == 0:
                assert measured == pytest.approx(stored, rel=1e-4, abs=1e-7), (name, v.key)
            else:  # w.r.t. the dampened H: an upper bound of the measured loss
                assert measured <= stored * (1 + 1e-4) + 1e-9, (name, v.key)
                damped_seen.add(name)
            assert e.variants[v.key]["error"] == pytest.approx(stored / e.dense_energy, rel=1e-9)
            if v.bits is not None:
                # per-channel grids: every row takes at most 2^bits values
                rows = Wv.reshape(-1, Wv.shape[-1])
                assert max(torch.unique(r).numel() for r in rows) <= 2 ** v.bits
            # the same variant through compress's recipe path gives the same weights
            if name == "fc1" and v.key in ("s0.5000", "w4", "2:4+w4", "s0.5000+w3"):
                m2 = copy.deepcopy(model)
                recipe = db.recipe({name: v})
                compress(m2, recipe, data, num_calibration_samples=64, progress=False)
                Wc = weight_groups(find_layers(m2)[name])
                torch.testing.assert_close(Wc, Wv, rtol=1e-4, atol=1e-5)
        if name == "conv1":  # 27 inputs, 1024 samples: no dampening, every loss measured exactly
            assert all(x["damp"] == 0 for x in e.variants.values())
        # sparsity of pruned variants is the level asked for (counted over the layer, per group)
        for v in db.options(name):
            if v.pruned and v.kind == "unstructured" and v.bits is None:
                Wv = db.weights(name, v, W)
                assert float((Wv == 0).float().mean()) >= v.sparsity - 1.0 / W[0].numel()


def test_interrupted_build_resumes_to_identical_files(tmp_path, monkeypatch):
    model, data = _setup(1)
    full = build_database(model, data, tmp_path / "a", SPACE, num_calibration_samples=64, progress=False)
    real = dbmod._build_layer
    calls = []

    def flaky(name, *a, **k):
        calls.append(name)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated interrupt")
        return real(name, *a, **k)

    monkeypatch.setattr(dbmod, "_build_layer", flaky)
    with pytest.raises(KeyboardInterrupt):
        build_database(model, data, tmp_path / "b", SPACE, num_calibration_samples=64, progress=False)
    assert len(list((tmp_path / "b" / "layers").glob("*.safetensors"))) == 2
    assert not list((tmp_path / "b" / "layers").glob(".*"))  # no half-written (hidden temporary) file
    with pytest.raises(ValueError, match="incomplete"):
        load_database(tmp_path / "b", model)
    monkeypatch.setattr(dbmod, "_build_layer", real)
    calls.clear()
    resumed = build_database(model, data, tmp_path / "b", SPACE, num_calibration_samples=64, progress=False)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        assert _strip_seconds(a[k]) == _strip_seconds(b[k]), k
    assert {n: e.variants.keys() for n, e in resumed.layers.items()} == {n: e.variants.keys() for n, e in full.layers.items()}


def _strip_seconds(raw: bytes) -> bytes:
    # Timings differ between runs; everything else in a layer file must be byte-identical.
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    meta = json.loads(header.pop("__metadata__")["obcompress"])
    meta.pop("seconds")
    meta.pop("sha256")  # a digest of the content, seconds included
    for v in meta["variants"].values():
        v.pop("seconds")
    return json.dumps([header, meta], sort_keys=True).encode() + raw[8 + n :]


def test_stop_after_builds_in_slices(tmp_path):
    model, data = _setup(2)
    part = build_database(model, data, tmp_path, SPACE, num_calibration_samples=64, progress=False, stop_after=1)
    assert part.names == ["conv1"]
    whole = build_database(model, data, tmp_path, SPACE, num_calibration_samples=64, progress=False)
    assert whole.names == ["conv1", "dw", "fc1", "fc2"]
    assert load_database(tmp_path, model).nbytes == whole.nbytes


def test_foreign_model_data_or_space_refused(tmp_path):
    model, data = _setup(3)
    build_database(model, data, tmp_path, SPACE, num_calibration_samples=64, progress=False)
    other, _ = _setup(4)
    with pytest.raises(ValueError, match="other weights"):
        load_database(tmp_path, other)
    with pytest.raises(ValueError, match="another model"):
        load_database(tmp_path, nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(ValueError, match="another model"):
        build_database(other, data, tmp_path, SPACE, num_calibration_samples=64, progress=False)
    _, data2 = _setup(5)
    with pytest.raises(ValueError, match="calibration"):
        build_database(model, data2, tmp_path, SPACE, num_calibration_samples=64, progress=False)
    with pytest.raises(ValueError, match="space"):
        build_database(model, data, tmp_path, default_space(), num_calibration_samples=64, progress=False)
    with pytest.raises(ValueError, match="not an obcompress database"):
        load_database(tmp_path / "nowhere")
    db = load_database(tmp_path, model)
    with pytest.raises(ValueError, match="layer nope"):
        db.options("nope")
    with pytest.raises(ValueError, match="not in the database"):
        db.weights("dw", "2:4", weight_groups(find_layers(model)["dw"]))
    with pytest.raises(ValueError, match="nothing to compress"):
        db.recipe({"fc1": Variant()})


def test_space_and_variant_keys():
    s = default_space()
    keys = [v.key for v in s.variants]
    assert keys[0] == "dense" and len(keys) == len(set(keys))
    # the paper's grid: density 0.9^k up to 99 % sparsity, block-4 up to 95 %
    assert sum(1 for v in s.variants if v.kind == "unstructured" and v.pruned and v.bits is None) == 43
    assert max(v.sparsity for v in s.variants if v.kind == "block") <= 0.95
    for k in keys:
        assert Variant.from_key(k).key == k
    with pytest.raises(ValueError):
        Variant(bits=9)
    with pytest.raises(ValueError):
        Variant("unstructured", 1.0)
    with pytest.raises(ValueError, match="not a variant key"):
        Variant.from_key("x4")
    assert not Variant("2:4").fits(9) and Variant("2:4").fits(8)
    # joint variants only where a group has joint_min_cols columns (default 32)
    assert not any(v.pruned and v.bits for v in s.for_layer(25))
    assert any(v.pruned and v.bits for v in s.for_layer(32))


def _flip_data_byte(path):
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    pos = 8 + n + (len(raw) - 8 - n) // 2  # inside the tensor data, not the header
    raw[pos] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_a_corrupted_layer_file_is_refused_and_rebuilt(tmp_path):
    model, data = _setup()
    d = tmp_path / "db"
    build_database(model, data, d, SPACE, num_calibration_samples=64, progress=False)
    good = _files(d)
    victim = sorted((d / "layers").glob("fc1-*.safetensors"))[0]
    _flip_data_byte(victim)
    with pytest.raises(ValueError, match=r"layer fc1: database file .* is corrupted.*search build"):
        load_database(d, model)
    # A build resumes over it: only that layer is redone, to the same bytes.
    with pytest.warns(UserWarning, match="rebuilding it"):
        build_database(model, data, d, SPACE, num_calibration_samples=64, progress=False)
    rebuilt = _files(d)
    assert rebuilt.keys() == good.keys()
    for k in good:
        assert _strip_seconds(rebuilt[k]) == _strip_seconds(good[k]), k
    # the other layers were not redone: their files are untouched, timings included
    assert all(rebuilt[k] == good[k] for k in good if k != victim.name)
    load_database(d, model)


def test_corrupted_metadata_numbers_are_detected(tmp_path):
    model, data = _setup()
    d = tmp_path / "db"
    build_database(model, data, d, SPACE, num_calibration_samples=64, progress=False)
    victim = sorted((d / "layers").glob("fc2-*.safetensors"))[0]
    raw = victim.read_bytes()
    # One digit of a recorded loss changed, the JSON still valid.
    key = b'loss\\": '
    i = raw.index(key) + len(key)
    while not raw[i:i + 1].isdigit() or raw[i:i + 1] == b"0":
        i += 1
    victim.write_bytes(raw[:i] + (b"1" if raw[i:i + 1] != b"1" else b"2") + raw[i + 1:])
    with pytest.raises(ValueError, match="layer fc2: database file .* is corrupted"):
        load_database(d, model)


def test_a_second_build_on_the_same_database_is_refused_while_one_runs(tmp_path):
    from obcompress._locks import directory_lock

    model, data = _setup()
    d = tmp_path / "db"
    d.mkdir()
    with directory_lock(d, wait=True, what="test"):  # what a running build holds
        with pytest.raises(ValueError, match="in use by another process"):
            build_database(model, data, d, SPACE, num_calibration_samples=64, progress=False)
    build_database(model, data, d, SPACE, num_calibration_samples=64, progress=False, stop_after=1)
