import json
import math

import pytest
import torch
from safetensors import safe_open
from torch import nn

from obcompress.api import compress
from obcompress.formats import save
from obcompress.model.layers import find_layers
from obcompress.search import costs as costs_mod
from obcompress.search.costs import (
    BopsCost,
    FlopsCost,
    LatencyCost,
    SizeCost,
    cost_from_dict,
    dense_total,
    kept_weights,
    make_cost,
    model_totals,
)
from obcompress.search.space import LayerGeometry, Variant

FC = LayerGeometry("fc", "linear", 1, 4, 8, 1, 3.0)  # 32 weights, 3 tokens per sample
DW = LayerGeometry("dw", "conv2d", 8, 1, 9, 9, 36.0, has_bias=True)  # depthwise 3x3 over 8 channels
CONV = LayerGeometry("conv", "conv2d", 1, 6, 4 * 9, 9, 25.0)


# ---------------------------------------------------------------------------------------------
# hand counts


def test_kept_weights_follow_the_solvers_count_rule():
    assert kept_weights(FC, Variant()) == 32
    assert kept_weights(FC, Variant("unstructured", 0.5)) == 16
    assert kept_weights(FC, Variant("unstructured", 0.3)) == 32 - 10  # 9.6 rounds half up to 10
    assert kept_weights(FC, Variant("block:4", 0.3)) == 32 - 4 * 2  # 2.4 of 8 blocks -> 2 blocks
    assert kept_weights(FC, Variant("2:4")) == 16
    assert kept_weights(FC, Variant("1:4")) == 8
    # Conv groups are pruned one by one: 0.3 * 9 = 2.7 -> 3 of each depthwise filter.
    assert kept_weights(DW, Variant("unstructured", 0.3)) == 8 * 6


def test_bops_hand_count():
    bops = BopsCost()  # 8-bit activations, 16-bit floats
    assert bops(FC, Variant("unstructured", 0.5, 4)) == 4 * 8 * 3 * 0.5 * 4 * 8
    assert bops(FC, Variant(bits=8)) == 4 * 8 * 3 * 8 * 8
    assert bops.dense(FC) == 4 * 8 * 3 * 16 * 16 == bops(FC, Variant())
    # A pruned float layer still runs in float; only density changes.
    assert bops(FC, Variant("2:4")) == 4 * 8 * 3 * 0.5 * 16 * 16
    assert BopsCost(activation_bits=4, float_bits=32)(FC, Variant(bits=2)) == 96 * 2 * 4
    assert BopsCost(float_bits=32).dense(DW) == 72 * 36 * 32 * 32


def test_flops_hand_count():
    flops = FlopsCost()
    assert flops.unit == "MAC"
    assert flops.dense(FC) == 96
    assert flops(FC, Variant("unstructured", 0.5, 4)) == 48
    assert flops(FC, Variant(bits=2)) == 96  # bits do not skip work
    assert flops(DW, Variant("unstructured", 0.3)) == 48 * 36


def test_size_hand_counts_per_channel():
    size = SizeCost()
    assert size.unit == "bit"
    # float: 32 weights x 4 bytes; 50 %: 4 mask bytes + 16 x 4 bytes
    assert size.dense(FC) == 8 * 128
    assert size(FC, Variant("unstructured", 0.5)) == 8 * (4 + 64)
    # 4 bits: 16 code bytes + 4 float32 scales + one uint8 zero point for the symmetric grid
    assert size.tensor_bytes(FC, Variant(bits=4)) == {"codes": 16, "scale": 16, "zero": 1}
    assert size(FC, Variant(bits=4)) == 8 * 33
    # 3 bits pack without waste: 96 bits = 12 bytes
    assert size(FC, Variant(bits=3)) == 8 * (12 + 16 + 1)
    # 50 % at 4 bits: mask 4 + 16 kept codes 8 = 12 < 16 dense code bytes
    assert size.tensor_bytes(FC, Variant("unstructured", 0.5, 4)) == {"mask": 4, "codes": 8, "scale": 16, "zero": 1}
    # 2:4 at 2 bits: mask 4 + 4 = 8 is not smaller than 8 dense code bytes -> dense codes
    assert size.tensor_bytes(FC, Variant("2:4", bits=2)) == {"codes": 8, "scale": 16, "zero": 1}
    # asymmetric: one uint8 zero point per scale; group strategy: one scale per row and group
    assert SizeCost(symmetric=False)(FC, Variant(bits=4)) == 8 * (16 + 16 + 4)
    assert SizeCost(strategy="group", group_size=3).tensor_bytes(FC, Variant(bits=4))["scale"] == 4 * 4 * 3
    assert SizeCost(strategy="tensor").tensor_bytes(DW, Variant(bits=4))["scale"] == 4 * 8
    # depthwise: 72 weights, one row per group -> 8 scales
    assert SizeCost().tensor_bytes(DW, Variant(bits=4)) == {"codes": 36, "scale": 32, "zero": 1}


def test_size_picks_the_smaller_float_storage():
    size = SizeCost()
    g = LayerGeometry("big", "linear", 1, 64, 64)
    # A bitmask costs 1/32 of the float values: below ~3 % sparsity the dense values are smaller.
    assert set(size.tensor_bytes(g, Variant("unstructured", 0.02))) == {"values"}
    assert size(g, Variant("unstructured", 0.02)) == size.dense(g)
    assert set(size.tensor_bytes(g, Variant("unstructured", 0.05))) == {"mask", "values"}


def test_scales_can_outweigh_few_kept_floats():
    # 90 % of a 4 x 8 layer: 3 kept floats behind a 4-byte mask beat 4 float32 scales of any grid.
    size = SizeCost()
    assert size(FC, Variant("unstructured", 0.9)) == 8 * (4 + 4 * 3)
    assert size(FC, Variant("unstructured", 0.9, 2)) == 8 * (4 + 1 + 16 + 1)
    big = LayerGeometry("big", "linear", 1, 64, 64)
    assert size(big, Variant("unstructured", 0.9, 8)) < size(big, Variant("unstructured", 0.9))


# ---------------------------------------------------------------------------------------------
# monotonicity and consistency


GEOMS = [FC, DW, CONV, LayerGeometry("wide", "linear", 1, 16, 64, 1, 7.0),
         LayerGeometry("c1", "conv1d", 1, 5, 12, 3, 11.0)]
LEVELS = (0.0, 0.1, 0.3, 0.5, 0.75, 0.9, 0.99)
BITS = (None, 8, 6, 4, 3, 2)


@pytest.mark.parametrize("cost", [SizeCost(), SizeCost(symmetric=False), BopsCost(), FlopsCost()], ids=repr)
def test_more_sparsity_or_fewer_bits_never_costs_more(cost):
    for g in GEOMS:
        dense = cost.dense(g)
        table = {(s, b): cost(g, Variant("unstructured", s, b)) for s in LEVELS for b in BITS}
        for b in BITS:
            col = [table[s, b] for s in LEVELS]
            assert all(x >= y for x, y in zip(col, col[1:])), (g.name, b, col)
        for s in LEVELS:
            # float, then 8 down to 2 bits; the size of a float variant is compared with the
            # quantized ones only when dense (see test_scales_can_outweigh_few_kept_floats)
            row = [table[s, b] for b in BITS[cost.name == "size" and s > 0:]]
            assert all(x >= y for x, y in zip(row, row[1:])), (g.name, s, row)
        assert max(table.values()) == dense == table[0.0, None]
        # 99 % of a 32-weight layer rounds to all 32 pruned: no work left, but a mask to store.
        assert min(table.values()) > 0 if cost.name == "size" else min(table.values()) >= 0


def test_structured_patterns_cost_their_kept_weights():
    size, flops = SizeCost(), FlopsCost()
    g = LayerGeometry("g", "linear", 1, 8, 16)
    # Same kept count -> same cost, whatever the pattern.
    for v in (Variant("2:4", bits=4), Variant("block:4", 0.5, 4), Variant("unstructured", 0.5, 4)):
        assert kept_weights(g, v) == 64
        assert size(g, v) == size(g, Variant("unstructured", 0.5, 4))
        assert flops(g, v) == 64
    with pytest.raises(ValueError, match="layer 'dw'.*2:4"):
        size(DW, Variant("2:4"))  # 9 columns per group are not divisible by 4
    with pytest.raises(ValueError, match="layer 'dw'"):
        FlopsCost()(DW, Variant("block:2", 0.5))


def test_to_dict_round_trip_and_make_cost(tmp_path):
    costs = [SizeCost(), SizeCost(symmetric=False, strategy="group", group_size=32), BopsCost(4, 32), FlopsCost(),
             LatencyCost(batch=2, threads=1, repeats=3, warmup=0, cache_path=tmp_path / "lat.json")]
    for c in costs:
        d = json.loads(json.dumps(c.to_dict()))
        back = cost_from_dict(d)
        assert back == c and type(back) is type(c) and back.name == d["name"]
    assert make_cost("bops", activation_bits=4).activation_bits == 4
    assert {make_cost(n).name for n in ("size", "bops", "flops", "latency")} == {"size", "bops", "flops", "latency"}


def test_totals():
    geoms = {g.name: g for g in (FC, DW, CONV)}
    choice = {"fc": Variant(bits=4), "dw": Variant(), "conv": Variant("2:4")}
    for cost in (SizeCost(), BopsCost(), FlopsCost()):
        assert model_totals(cost, geoms, choice) == sum(cost(geoms[n], v) for n, v in choice.items())
        assert dense_total(cost, geoms) == model_totals(cost, geoms, {n: Variant() for n in geoms})
        assert model_totals(cost, geoms, choice) < dense_total(cost, geoms)
    with pytest.raises(ValueError, match=r"no variant chosen for layers \['conv'\]"):
        model_totals(FlopsCost(), geoms, {"fc": Variant(), "dw": Variant()})
    with pytest.raises(ValueError, match="unknown layers"):
        model_totals(FlopsCost(), geoms, {**choice, "head": Variant()})
    with pytest.raises(ValueError, match="cost model"):
        dense_total("size", geoms)


def test_bad_input():
    with pytest.raises(ValueError, match="unknown cost 'speed'"):
        make_cost("speed")
    with pytest.raises(ValueError, match="unknown settings"):
        make_cost("flops", bits=3)
    with pytest.raises(ValueError, match="activation_bits"):
        BopsCost(activation_bits=-8)
    with pytest.raises(ValueError, match="float_bits"):
        make_cost("bops", float_bits=0)
    with pytest.raises(ValueError, match="group_size"):
        SizeCost(strategy="group")
    with pytest.raises(ValueError, match="group_size"):
        SizeCost(group_size=16)
    with pytest.raises(ValueError, match="strategy"):
        SizeCost(strategy="row")
    with pytest.raises(ValueError, match="batch"):
        LatencyCost(batch=0)
    with pytest.raises(ValueError, match="threads"):
        LatencyCost(threads=-1)
    with pytest.raises(ValueError, match="name"):
        cost_from_dict({"activation_bits": 8})
    with pytest.raises(ValueError, match="bits"):
        Variant(bits=9)
    with pytest.raises(ValueError, match="layer 'x': unknown layer kind 'lstm'"):
        SizeCost()(LayerGeometry("x", "lstm", 1, 4, 4), Variant())
    with pytest.raises(ValueError, match="layer 'x': positions"):
        BopsCost()(LayerGeometry("x", "linear", 1, 4, 4, 1, 0.0), Variant())
    with pytest.raises(ValueError, match="Variant"):
        FlopsCost()(FC, "w4")


# ---------------------------------------------------------------------------------------------
# the size cost is what the artifact really writes


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)  # 8 rows x 36 cols
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)  # 8 groups of 1 row x 9 cols
        self.fc = nn.Linear(8 * 2 * 2, 12)  # 12 x 32

    def forward(self, x):
        x = torch.relu(self.dw(torch.relu(self.conv(x))))
        return self.fc(nn.functional.avg_pool2d(x, 2).flatten(1))


# (conv, dw, fc) per round, every storage branch: codes, mask + codes, dense codes despite a mask,
# values, mask + values, float32 scales per row and per depthwise group, the uncompressed layer.
ROUNDS = [
    {"conv": Variant(bits=4), "dw": Variant("unstructured", 0.5), "fc": Variant("2:4", bits=4)},
    {"conv": Variant("2:4"), "dw": Variant("unstructured", 0.3, 2), "fc": Variant("block:4", 0.5, 8)},
    {"conv": Variant("unstructured", 0.02), "dw": Variant(bits=3), "fc": Variant()},
    {"conv": Variant("unstructured", 0.5, 4), "fc": Variant(bits=6)},  # asymmetric grids
]


def _layer_tensor_bytes(path, name):
    out = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            if key.startswith(f"layer::{name}::"):
                t = f.get_tensor(key)
                out[key.split("::")[-1]] = t.numel() * t.element_size()
            elif key == f"state::{name}.weight":  # an uncompressed layer's weight is stored as is
                t = f.get_tensor(key)
                out["values"] = t.numel() * t.element_size()
    return out


@pytest.mark.parametrize("round_", range(len(ROUNDS)))
def test_size_cost_equals_artifact_bytes(tmp_path, round_):
    choice = ROUNDS[round_]
    symmetric = round_ != 3
    torch.manual_seed(round_)
    model = Toy().eval()
    if not symmetric:
        # Row offsets give each row its own zero point: save stores equal ones once, which the
        # cost does not predict (see SizeCost).
        with torch.no_grad():
            for m in (model.conv, model.fc):
                m.weight += torch.linspace(-0.3, 0.3, m.weight.shape[0]).reshape(-1, *[1] * (m.weight.dim() - 1))
    data = [torch.randn(16, 4, 4, 4) for _ in range(2)]
    layers = {}
    for name, v in choice.items():
        if v == Variant():
            continue
        entry = v.recipe_entry()
        if entry["quantization"] is not None:
            entry["quantization"]["symmetric"] = symmetric
        layers[name] = entry
    recipe = {"solver": "exact", "targets": sorted(layers), "layers": layers}
    result = compress(model, recipe, data, num_calibration_samples=32, progress=False)
    config = save(model, result, tmp_path / "art")

    size = SizeCost(symmetric=symmetric)
    for name, info in find_layers(model).items():
        if name not in choice:
            continue
        geom = LayerGeometry(name, info.kind, info.groups, info.rows, info.cols, info.taps)
        v = choice[name]
        written = _layer_tensor_bytes(tmp_path / "art" / "model.safetensors", name)
        assert written == size.tensor_bytes(geom, v), (name, v.key, config["layers"].get(name))
        assert sum(written.values()) * 8 == size(geom, v)
        if name in config["layers"]:
            assert config["layers"][name]["kept"] == kept_weights(geom, v)
            assert config["layers"][name]["bytes"]["total"] * 8 == size(geom, v)


# ---------------------------------------------------------------------------------------------
# latency: properties only, never speeds


def _lat(**kw):
    # One thread: two threads on a shared 2-core machine make tiny kernels wait on each other.
    return LatencyCost(threads=1, repeats=2, warmup=1, **kw)


def test_latency_kernels_and_cache():
    lat = _lat()
    assert lat.kernels(FC, Variant()) == [("dense", 1.0)]
    assert lat.best(FC, Variant())[0] == "dense"
    assert [k for k, _ in lat.kernels(FC, Variant("unstructured", 0.5, 4))] == ["dense", "csr", "int8"]
    assert [k for k, _ in lat.kernels(DW, Variant(bits=4))] == ["dense"]  # no grouped int8 kernel
    assert lat.kernels(FC, Variant("unstructured", 0.999)) == [("dense", 1.0), ("csr", 0.01)]

    v = Variant("unstructured", 0.5, 4)
    t = lat(FC, v)
    assert t > 0 and math.isfinite(t)
    assert t == min(lat.measure(FC, k, d) for k, d in lat.kernels(FC, v))
    n = lat.measurements
    assert n == 3
    assert lat(FC, v) == t and lat.dense(FC) == lat.measure(FC, "dense") and lat.measurements == n
    assert lat(DW, Variant("unstructured", 0.5)) > 0
    # A conv of 25 positions runs on a 5 x 5 output, recorded with the measurement.
    lat.measure(CONV, "dense")
    entry = lat.cache[lat.key(CONV, "dense")]
    assert entry["spatial"] == [5, 5] and entry["positions"] == 25


def test_latency_cache_file_round_trip(tmp_path):
    path = tmp_path / "cache" / "latency.json"
    first = _lat(cache_path=path)
    t = first(FC, Variant("2:4"))
    assert path.is_file()
    again = _lat(cache_path=path)
    assert again(FC, Variant("2:4")) == t and again.measurements == 0
    assert again.cache == first.cache

    data = json.loads(path.read_text())
    data["machine"] = "some other CPU"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="measured on 'some other CPU'"):
        _lat(cache_path=path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="cannot be read as JSON"):
        _lat(cache_path=path)


@pytest.mark.parametrize("geom", [FC, CONV, DW, LayerGeometry("c1", "conv1d", 2, 3, 8, 4, 6.0),
                                  LayerGeometry("c2", "conv2d", 1, 3, 4 * 6, 6, 9.0)], ids=lambda g: g.name)
def test_latency_kernels_compute_the_layer(geom):
    # What is timed must be the layer itself: the sparse kernel at full density and the int8
    # kernel give the dense layer's output.
    bench = costs_mod._Bench(geom, batch=2)
    ref = bench.dense()()
    ref2 = ref.reshape(2, geom.groups * geom.rows, -1) if geom.kind != "linear" else ref.t()
    sparse = bench.csr(1.0)()
    if geom.kind == "linear":
        assert torch.allclose(sparse, ref2, atol=1e-4)
    else:
        assert torch.allclose(sparse.reshape(-1, 2, bench.positions).transpose(0, 1), ref2, atol=1e-4)
        assert ref2.shape[-1] == bench.positions
    int8 = bench.int8()
    if geom.groups > 1:
        assert int8 is None
    else:
        out = int8()
        expect = ref2.t() if geom.kind == "linear" else ref2.transpose(1, 2).reshape(-1, geom.rows)
        assert out.shape == expect.shape
        assert (out - expect).abs().max() < 0.1 * expect.abs().max()
