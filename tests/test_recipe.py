import copy
import re

import pytest
import yaml

from obcompress.recipe import (
    ActivationScheme,
    LayerScheme,
    QuantizationScheme,
    Recipe,
    RecipeError,
    SparsityScheme,
)

FULL = {
    "targets": ["Linear", "Conv2d"],
    "ignore": ["re:.*classifier.*", "conv1"],
    "solver": "exact",
    "quantization": {
        "num_bits": 4, "symmetric": True, "strategy": "channel", "group_size": None, "mse": False,
        "act_order": False, "activations": {"num_bits": 8, "symmetric": False, "mse": True},
    },
    "sparsity": {"sparsity": 0.5, "mask_structure": "unstructured"},
    "damp": "auto",
    "calibration": "parallel",
    "corrections": {"bn_reestimation": False, "statistics_correction": True},
    "layers": {"features.3.conv": {"quantization": {"num_bits": 8}, "sparsity": {"sparsity": 0.3}}},
}

Q4 = {"num_bits": 4}
S50 = {"sparsity": 0.5}


def r(**kw):
    return Recipe.from_dict(kw)


# ---- round trips ------------------------------------------------------------------------

@pytest.mark.parametrize("d", [
    FULL,
    {"solver": "rtn", "quantization": Q4},
    {"solver": "gptq", "quantization": {"num_bits": 3, "strategy": "group", "group_size": 32, "act_order": True}},
    {"solver": "magnitude", "sparsity": {"mask_structure": "2:4"}, "quantization": Q4},
    {"solver": "sparsegpt", "sparsity": {"sparsity": 0.6}},
    {"solver": "exact", "sparsity": {"sparsity": 0.25, "mask_structure": "block:4"}, "damp": 0.01,
     "calibration": "sequential", "quantization": {"num_bits": 2, "strategy": "tensor", "symmetric": False}},
    {"quantization": Q4, "layers": {"re:fc\\..*": {"quantization": None, "sparsity": S50}, "0": {"damp": 0}}},
])
def test_round_trip_dict_and_yaml(d):
    rec = Recipe.from_dict(copy.deepcopy(d))
    out = rec.to_dict()
    assert Recipe.from_dict(out) == rec
    assert Recipe.from_dict(out).to_dict() == out
    text = rec.to_yaml()
    assert Recipe.from_yaml(text) == rec
    # A plain YAML 1.1 reader gets the same data back (e.g. '2:4' is quoted, not a base-60 number).
    assert yaml.safe_load(text) == out


def test_full_recipe_fields():
    rec = Recipe.from_dict(FULL)
    assert rec.targets == ("Linear", "Conv2d")
    assert rec.ignore == ("re:.*classifier.*", "conv1")
    assert rec.quantization == QuantizationScheme(4, activations=ActivationScheme(8, symmetric=False))
    assert rec.sparsity == SparsityScheme(0.5, "unstructured")
    assert rec.corrections.statistics_correction and not rec.corrections.bn_reestimation
    assert rec.quantization.grid_kwargs() == {"bits": 4, "symmetric": True, "strategy": "channel",
                                              "group_size": None, "mse": False}


def test_defaults():
    rec = r(quantization=Q4)
    assert (rec.solver, rec.damp, rec.calibration, rec.targets, rec.ignore) == ("exact", "auto", "parallel", None, ())
    q = rec.quantization
    assert (q.symmetric, q.strategy, q.group_size, q.mse, q.act_order, q.activations) == (
        True, "channel", None, False, False, None)
    assert rec.sparsity is None and rec.layers == {}


def test_yaml_text_and_file(tmp_path):
    text = """
solver: exact
sparsity: {mask_structure: 2:4}     # unquoted: must not become the base-60 number 124
quantization: {num_bits: 4}
damp: 1e-2                          # YAML 1.1 would read this as a string
ignore: [0]                         # nn.Sequential names are digits
layers:
  3: {quantization: {num_bits: 8}}
"""
    rec = Recipe.from_yaml(text)
    assert rec.sparsity.mask_structure == "2:4" and rec.sparsity.target == 0.5
    assert rec.damp == 0.01
    assert rec.ignore == ("0",) and "3" in rec.layers
    p = tmp_path / "r.yaml"
    p.write_text(text)
    assert Recipe.from_yaml(p) == rec
    assert Recipe.from_yaml(str(p)) == rec


def test_yaml_errors(tmp_path):
    with pytest.raises(RecipeError, match="file not found"):
        Recipe.from_yaml(str(tmp_path / "missing.yaml"))
    with pytest.raises(RecipeError, match="file not found"):
        Recipe.from_yaml(tmp_path / "missing.yml")
    with pytest.raises(RecipeError, match="invalid YAML"):
        Recipe.from_yaml("quantization: {num_bits: 4")
    with pytest.raises(RecipeError, match="empty"):
        Recipe.from_yaml("")
    with pytest.raises(RecipeError, match="must be a mapping"):
        Recipe.from_yaml("- a\n- b\n")


def test_nm_sparsity_is_optional_and_checked():
    assert r(sparsity={"mask_structure": "1:4"}).sparsity.target == 0.75
    assert r(sparsity={"mask_structure": "2:4", "sparsity": 0.5}).sparsity.sparsity == 0.5
    assert r(sparsity={"sparsity": 0.5, "mask_structure": "block:1"}).sparsity.mask_structure == "unstructured"


# ---- validation: one clear error per problem, naming the key path ---------------------------

BAD = [
    # unknown keys at every level, with a suggestion
    ({"quantisation": Q4}, "unknown key 'quantisation' (did you mean 'quantization'?)"),
    ({"quantization": {"num_bits": 4, "symetric": True}}, "unknown key 'quantization.symetric' (did you mean 'quantization.symmetric'?)"),
    ({"quantization": {"num_bits": 4, "activations": {"num_bits": 8, "bits": 1}}}, "unknown key 'quantization.activations.bits'"),
    ({"sparsity": {"sparsity": 0.5, "mask_structre": "2:4"}}, "did you mean 'sparsity.mask_structure'?"),
    ({"quantization": Q4, "corrections": {"bn_reestimate": True}}, "did you mean 'corrections.bn_reestimation'?"),
    ({"quantization": Q4, "zzz": 1}, "unknown key 'zzz' (allowed: targets"),
    ({"quantization": Q4, "layers": {"fc1": {"quantisation": Q4}}}, "unknown key 'layers.fc1.quantisation' (did you mean 'layers.fc1.quantization'?)"),
    ({"quantization": Q4, "layers": {"fc1": {"quantization": {"nbits": 3}}}}, "unknown key 'layers.fc1.quantization.nbits'"),
    ({"quantization": Q4, "layers": {"fc1": {"calibration": "sequential"}}}, "unknown key 'layers.fc1.calibration'"),
    # types and ranges
    ({"quantization": {"num_bits": 9}}, "recipe: quantization.num_bits must be an integer in 2..8, got 9"),
    ({"quantization": {"num_bits": 1}}, "quantization.num_bits must be an integer in 2..8, got 1"),
    ({"quantization": {"num_bits": 4.0}}, "quantization.num_bits must be an integer in 2..8, got 4.0"),
    ({"quantization": {"num_bits": True}}, "quantization.num_bits must be an integer"),
    ({"quantization": {"symmetric": True}}, "quantization.num_bits is required"),
    ({"quantization": {"num_bits": 4, "symmetric": "yes"}}, "quantization.symmetric must be true or false"),
    ({"quantization": {"num_bits": 4, "mse": 1}}, "quantization.mse must be true or false"),
    ({"quantization": {"num_bits": 4, "strategy": "row"}}, "quantization.strategy must be one of tensor, channel, group"),
    ({"quantization": {"num_bits": 4, "strategy": "chanel"}}, "did you mean 'channel'?"),
    ({"quantization": {"num_bits": 4, "activations": {"num_bits": 16}}}, "quantization.activations.num_bits must be an integer in 2..8"),
    ({"quantization": {"num_bits": 4, "activations": {"symmetric": True}}}, "quantization.activations.num_bits is required"),
    ({"quantization": {"num_bits": 4, "activations": 8}}, "quantization.activations must be a mapping"),
    ({"quantization": 4}, "quantization must be a mapping, got int 4"),
    ({"sparsity": 0.5}, "sparsity must be a mapping"),
    ({"sparsity": {"sparsity": 1.0}}, "sparsity.sparsity must be a number in [0, 1), got 1.0"),
    ({"sparsity": {"sparsity": -0.1}}, "sparsity.sparsity must be a number in [0, 1)"),
    ({"sparsity": {"sparsity": "half"}}, "sparsity.sparsity must be a number in [0, 1)"),
    ({"sparsity": {"mask_structure": "unstructured"}}, "sparsity.sparsity is required for sparsity.mask_structure: unstructured"),
    ({"sparsity": {"sparsity": 0.5, "mask_structure": "block:4"}, "layers": {"x": {"sparsity": {"mask_structure": "block:2", "sparsity": None}}}},
     "layers.x.sparsity.sparsity is required"),
    ({"sparsity": {"sparsity": 0.7, "mask_structure": "2:4"}}, "sparsity.sparsity=0.7 contradicts sparsity.mask_structure: 2:4"),
    ({"sparsity": {"mask_structure": "4:2"}}, "sparsity.mask_structure: mask_structure '4:2': need 0 < N < M"),
    ({"sparsity": {"mask_structure": "diagonal"}}, "sparsity.mask_structure: unknown mask_structure 'diagonal'"),
    ({"sparsity": {"mask_structure": 124}}, "quote it"),
    ({"quantization": Q4, "damp": -1}, "damp must be 'auto' or a number >= 0, got -1"),
    ({"quantization": Q4, "damp": "high"}, "damp must be 'auto' or a number >= 0"),
    ({"quantization": Q4, "damp": float("nan")}, "damp must be 'auto' or a number >= 0"),
    ({"quantization": Q4, "solver": "obq"}, "solver must be one of exact, best, gptq, sparsegpt, magnitude, rtn; got 'obq'"),
    ({"quantization": Q4, "calibration": "serial"}, "calibration must be one of parallel, sequential"),
    ({"quantization": Q4, "corrections": {"bn_reestimation": "on"}}, "corrections.bn_reestimation must be true or false"),
    ({"quantization": Q4, "corrections": True}, "corrections must be a mapping"),
    ({"quantization": Q4, "targets": "re:("}, "targets[0]: bad regular expression"),
    ({"quantization": Q4, "targets": []}, "targets is empty"),
    ({"quantization": Q4, "targets": {"Linear": 1}}, "targets must be a list of names"),
    ({"quantization": Q4, "ignore": [None]}, "ignore[0] must be a non-empty string"),
    ({"quantization": Q4, "ignore": ["ok", ""]}, "ignore[1] must be a non-empty string"),
    ({"quantization": Q4, "layers": ["fc1"]}, "layers must be a mapping"),
    ({"quantization": Q4, "layers": {"fc1": 8}}, "layers.fc1 must be a mapping"),
    ({"quantization": Q4, "layers": {"re:[": {"damp": 0}}}, "bad regular expression"),
    ({"quantization": Q4, "layers": {"fc1": {"quantization": {"num_bits": 12}}}}, "layers.fc1.quantization.num_bits must be an integer in 2..8, got 12"),
    # group_size rules
    ({"quantization": {"num_bits": 4, "strategy": "group"}}, "quantization.group_size must be an integer >= 1 when quantization.strategy is 'group', got None"),
    ({"quantization": {"num_bits": 4, "strategy": "group", "group_size": 0}}, "quantization.group_size must be an integer >= 1"),
    ({"quantization": {"num_bits": 4, "strategy": "group", "group_size": 64.0}}, "quantization.group_size must be an integer >= 1"),
    ({"quantization": {"num_bits": 4, "group_size": 64}}, "quantization.group_size is only used with quantization.strategy: group"),
    # solver / section combinations
    ({"solver": "rtn"}, "solver 'rtn' needs a quantization section"),
    ({"solver": "gptq", "sparsity": S50}, "solver 'gptq' needs a quantization section"),
    ({"solver": "rtn", "quantization": Q4, "sparsity": S50}, "solver 'rtn' cannot prune"),
    ({"solver": "gptq", "quantization": Q4, "sparsity": S50}, "solver 'gptq' cannot prune"),
    ({"solver": "magnitude", "quantization": Q4}, "solver 'magnitude' needs a sparsity section"),
    ({"solver": "sparsegpt", "quantization": Q4}, "solver 'sparsegpt' needs a sparsity section"),
    ({"solver": "sparsegpt", "sparsity": {"sparsity": 0.5, "mask_structure": "block:4"}}, "solver 'sparsegpt' does not support block masks"),
    ({"solver": "exact", "quantization": {"num_bits": 4, "act_order": True}}, "quantization.act_order is only supported by solver 'gptq', not 'exact'"),
    ({"solver": "rtn", "quantization": {"num_bits": 4, "act_order": True}}, "act_order is only supported by solver 'gptq'"),
    ({"quantization": Q4, "layers": {"fc1": {"solver": "gptq", "sparsity": S50}}}, "layers.fc1: solver 'gptq' cannot prune"),
    ({"quantization": Q4, "layers": {"fc1": {"solver": "magnitude"}}}, "layers.fc1: solver 'magnitude' needs a sparsity section"),
    ({"quantization": Q4, "layers": {"fc1": {"sparsity": {"sparsity": 0.3, "mask_structure": "2:4"}}}},
     "layers.fc1.sparsity.sparsity=0.3 contradicts"),
    # recipes that compress nothing
    ({}, "compresses nothing"),
    ({"solver": "exact", "targets": ["Linear"]}, "compresses nothing"),
    ({"sparsity": {"sparsity": 0.0}}, "compresses nothing"),
    ({"solver": "magnitude", "sparsity": {"sparsity": 0.0}}, "compresses nothing"),
    ({"quantization": Q4, "layers": {"re:.*": {"quantization": None}}, "sparsity": None}, None),  # valid: top level compresses
    ({"layers": {"fc1": {"sparsity": None}}}, "compresses nothing"),
]


@pytest.mark.parametrize("d,msg", BAD, ids=[str(i) for i in range(len(BAD))])
def test_validation_errors(d, msg):
    if msg is None:
        Recipe.from_dict(d)
        return
    with pytest.raises(ValueError) as ei:
        Recipe.from_dict(d)
    assert isinstance(ei.value, RecipeError)
    text = str(ei.value)
    assert text.startswith("recipe: ")
    assert msg in text, text


def test_not_a_mapping():
    with pytest.raises(RecipeError, match="must be a mapping, got list"):
        Recipe.from_dict([1, 2])
    with pytest.raises(RecipeError, match="empty"):
        Recipe.from_dict(None)
    with pytest.raises(RecipeError, match="is not a string"):
        Recipe.from_dict({1: 2})


def test_direct_construction_is_validated():
    with pytest.raises(RecipeError, match="num_bits must be an integer in 2..8"):
        QuantizationScheme(num_bits=9)
    with pytest.raises(RecipeError, match="contradicts"):
        SparsityScheme(0.3, "2:4")
    with pytest.raises(RecipeError, match="solver 'rtn' needs a quantization section"):
        Recipe(solver="rtn")
    with pytest.raises(RecipeError, match="cannot prune"):
        LayerScheme("gptq", QuantizationScheme(4), SparsityScheme(0.5), 0.01)
    assert Recipe(quantization=QuantizationScheme(4)) == r(quantization=Q4)


def test_layer_only_recipe_is_valid():
    # Nothing at the top level, but overrides compress some layers: the others are left alone.
    rec = r(layers={"fc1": {"quantization": Q4}})
    assert rec.for_layer("fc1", "Linear").bits == 4
    assert rec.for_layer("fc2", "Linear") is None


# ---- with_overrides ---------------------------------------------------------------------

def test_with_overrides():
    base = r(quantization=Q4, sparsity=S50)
    new = base.with_overrides(["quantization.num_bits=3", "sparsity.mask_structure=2:4",
                               "layers.fc1.sparsity.sparsity=0.7", "layers.fc1.sparsity.mask_structure=unstructured",
                               "solver=sparsegpt", "damp=1e-3"])
    assert new is not base and base.quantization.num_bits == 4  # the original is unchanged
    assert new.quantization.num_bits == 3
    # An N:M structure drops the inherited level (here 0.5, which would agree anyway).
    assert new.sparsity == SparsityScheme(None, "2:4")
    assert new.solver == "sparsegpt" and new.damp == 1e-3
    assert new.layers == {"fc1": {"sparsity": {"sparsity": 0.7, "mask_structure": "unstructured"}}}
    fc1 = new.for_layer("fc1", "Linear")
    assert (fc1.bits, fc1.sparsity) == (3, SparsityScheme(0.7, "unstructured"))
    # Without its own structure fc1 would inherit 2:4, which 0.7 contradicts: refused up front.
    with pytest.raises(RecipeError, match="layers.fc1.sparsity.sparsity=0.7 contradicts"):
        base.with_overrides(["sparsity.mask_structure=2:4", "layers.fc1.sparsity.sparsity=0.7"])


def test_with_overrides_nm_replaces_inherited_sparsity():
    base = r(sparsity={"sparsity": 0.7})
    assert base.with_overrides(["sparsity.mask_structure=1:4"]).sparsity.target == 0.75
    # Given together, an explicit level is kept and checked.
    with pytest.raises(RecipeError, match="contradicts"):
        base.with_overrides(["sparsity.mask_structure=2:4", "sparsity.sparsity=0.7"])
    ok = base.with_overrides(["sparsity.sparsity=0.5", "sparsity.mask_structure=2:4"])
    assert ok.sparsity == SparsityScheme(0.5, "2:4")


def test_with_overrides_sections_and_dotted_names():
    base = r(sparsity=S50)
    new = base.with_overrides([
        "quantization.num_bits=4",                       # creates the section, defaults filled
        "quantization.activations={num_bits: 8}",
        "targets=[Linear, Conv2d]",
        "layers.features.3.conv.quantization.num_bits=8",
        "layers.re:.*fc.*.sparsity=null",
        "corrections.bn_reestimation=true",
        "calibration=sequential",
    ])
    assert new.quantization == QuantizationScheme(4, activations=ActivationScheme(8))
    assert new.targets == ("Linear", "Conv2d")
    assert set(new.layers) == {"features.3.conv", "re:.*fc.*"}
    assert new.layers["features.3.conv"] == {"quantization": {"num_bits": 8}}
    assert new.layers["re:.*fc.*"] == {"sparsity": None}
    assert new.corrections.bn_reestimation and new.calibration == "sequential"
    assert new.with_overrides(["quantization=null"]).quantization is None
    assert new.with_overrides("damp=0").damp == 0.0  # a single string is one setting


@pytest.mark.parametrize("items,msg", [
    (["quantization.num_bits"], "expected key.path=value"),
    (["quantization.num_bits=9"], "quantization.num_bits must be an integer in 2..8, got 9"),
    (["quantisation.num_bits=4"], "did you mean 'quantization'?"),
    (["sparsity.sparsity=[1"], "invalid YAML"),
    ([".x=1"], "empty key path"),
    (["solver=rtn"], "solver 'rtn' cannot prune"),
    (["solver=1", "solver.x=2"], "was set to a value above"),
    (["layers.fc1.quantisation.num_bits=3"], "unknown key 'layers.fc1.quantisation'"),
])
def test_with_overrides_errors(items, msg):
    base = r(sparsity=S50, quantization=Q4)
    with pytest.raises(RecipeError) as ei:
        base.with_overrides(items)
    assert msg in str(ei.value), str(ei.value)


# ---- targets / ignore / per-layer resolution ------------------------------------------------

def test_targets_and_ignore():
    rec = r(quantization=Q4, targets=["Linear", "features.0", "re:head\\.\\d+"],
            ignore=["re:.*classifier.*", "fc2", "Conv1D"])
    assert rec.selects("fc1", "Linear")                     # class name
    assert not rec.selects("conv", "Conv2d")                # class not targeted
    assert rec.selects("features.0", "Conv2d")              # exact module name
    assert rec.selects("head.3", "Conv2d")                  # re: full match on the name
    assert not rec.selects("head.3.x", "Conv2d")            # ... full match, not search
    assert not rec.selects("model.classifier.fc", "Linear")  # ignored by re:
    assert not rec.selects("fc2", "Linear")                 # ignored by exact name
    assert not rec.selects("features.0", "Conv1D")          # ignored by class name
    assert rec.for_layer("fc2", "Linear") is None
    assert rec.for_layer("fc1", "Linear").bits == 4
    # The class may be given as a class or a module instance.
    torch = pytest.importorskip("torch")
    lin = torch.nn.Linear(2, 2)
    assert rec.selects("fc1", lin) and rec.selects("fc1", torch.nn.Linear)
    assert not rec.selects("c", torch.nn.Conv2d(1, 1, 1))


def test_no_targets_selects_every_layer():
    rec = r(quantization=Q4)
    assert rec.selects("anything", "Conv1d") and rec.selects("x", None)
    assert rec.for_layer("x", "Conv1d") == LayerScheme("exact", QuantizationScheme(4), None, "auto")


def test_for_layer_resolution_order():
    rec = Recipe.from_dict({
        "solver": "exact", "quantization": Q4, "sparsity": S50, "damp": 0.01,
        "layers": {
            "fc1": {"quantization": {"num_bits": 8}},               # exact name: applied last
            "re:fc.*": {"quantization": {"num_bits": 6, "symmetric": False}, "sparsity": {"sparsity": 0.3}},
            "re:fc1|fc3": {"sparsity": {"sparsity": 0.2}},          # later "re:" beats earlier "re:"
            "re:conv.*": {"solver": "gptq", "sparsity": None, "damp": "auto"},
            "re:head": {"quantization": None},
            "re:tail": {"quantization": None, "sparsity": None},
        },
    })
    fc1 = rec.for_layer("fc1", "Linear")
    assert fc1.bits == 8                                # exact beats re:, although listed first
    assert fc1.quantization.symmetric is False          # fields the exact entry leaves alone come from re:
    assert fc1.sparsity.sparsity == 0.2                 # the later re: wins
    fc2 = rec.for_layer("fc2", "Linear")
    assert (fc2.bits, fc2.sparsity.sparsity, fc2.quantization.symmetric) == (6, 0.3, False)
    fc3 = rec.for_layer("fc3", "Linear")
    assert (fc3.bits, fc3.sparsity.sparsity) == (6, 0.2)
    conv = rec.for_layer("conv1", "Conv2d")
    assert (conv.solver, conv.sparsity, conv.bits, conv.damp) == ("gptq", None, 4, "auto")
    head = rec.for_layer("head", "Linear")
    assert head.quantization is None and head.target_sparsity == 0.5
    assert rec.for_layer("tail", "Linear") is None     # nothing left to do
    other = rec.for_layer("other", "Linear")
    assert (other.bits, other.target_sparsity, other.damp) == (4, 0.5, 0.01)
    assert rec.matching_overrides("fc1") == ["re:fc.*", "re:fc1|fc3", "fc1"]


def test_for_layer_combination_error_names_layer():
    # Each override is fine alone, but together they ask gptq to prune.
    rec = r(quantization=Q4, sparsity=S50,
            layers={"re:a.*": {"solver": "gptq", "sparsity": None}, "re:.*b": {"sparsity": S50}})
    assert rec.for_layer("ax", "Linear").solver == "gptq"
    with pytest.raises(RecipeError, match=r"layer 'ab' \(overrides 're:a\.\*', 're:\.\*b'\): solver 'gptq' cannot prune"):
        rec.for_layer("ab", "Linear")


def test_for_layer_nm_override():
    rec = r(solver="magnitude", sparsity={"sparsity": 0.7},
            layers={"fc1": {"sparsity": {"mask_structure": "2:4"}}})
    s = rec.for_layer("fc1", "Linear").sparsity
    assert (s.sparsity, s.mask_structure, s.target) == (None, "2:4", 0.5)
    assert rec.for_layer("fc2", "Linear").target_sparsity == 0.7


def test_strategy_override_drops_inherited_group_size():
    rec = r(quantization={"num_bits": 4, "strategy": "group", "group_size": 64},
            layers={"fc1": {"quantization": {"strategy": "channel"}}})
    assert rec.for_layer("fc1", "Linear").quantization.group_size is None
    assert rec.for_layer("fc2", "Linear").quantization.group_size == 64
    new = rec.with_overrides(["quantization.strategy=tensor"])
    assert (new.quantization.strategy, new.quantization.group_size) == ("tensor", None)
    with pytest.raises(RecipeError, match="quantization.group_size must be an integer >= 1"):
        r(quantization=Q4).with_overrides(["quantization.strategy=group"])


def test_unused_overrides():
    rec = r(quantization=Q4, layers={"fc1": {"quantization": {"num_bits": 8}}, "re:conv\\d": {"damp": 0},
                                     "re:head.*": {"damp": 0}, "missing": {"damp": 0}})
    assert rec.unused_overrides(["fc1", "conv2", "fc2"]) == ["re:head.*", "missing"]
    assert rec.unused_overrides([]) == ["fc1", "re:conv\\d", "re:head.*", "missing"]
    assert rec.unused_overrides(["fc1", "conv1", "head", "missing"]) == []


def test_recipe_is_immutable():
    rec = r(quantization=Q4, layers={"fc1": {"damp": 0}})
    with pytest.raises(Exception):
        rec.solver = "rtn"
    d = rec.to_dict()
    d["layers"]["fc1"]["damp"] = 1
    assert rec.layers["fc1"]["damp"] == 0


def test_scale_keys_validate_and_round_trip_only_when_set():
    base = {"quantization": {"num_bits": 4}}
    assert set(Recipe.from_dict(base).to_dict()) & {"sequential_targets", "layer_loss", "executor", "device"} == set()
    rec = Recipe.from_dict(dict(base, calibration="sequential", sequential_targets="LlamaDecoderLayer",
                                layer_loss=True, executor="ray", device="cuda"))
    assert rec.sequential_targets == ("LlamaDecoderLayer",) and rec.layer_loss and rec.executor == "ray"
    assert rec.device == "cuda" and Recipe.from_yaml(rec.to_yaml()) == rec
    assert Recipe.from_dict(dict(base, device="cuda:1")).device == "cuda:1"
    assert Recipe.from_dict(base).with_overrides(["executor=ray", "device=cpu"]).executor == "ray"
    for bad, msg in [({"executor": "dask"}, "executor must be one of local, ray"),
                     ({"device": "tpu"}, "device must be null, 'cpu', 'cuda' or 'cuda:N'"),
                     ({"layer_loss": "yes"}, "layer_loss must be true or false"),
                     ({"sequential_targets": []}, "sequential_targets is empty"),
                     ({"executer": "ray"}, "did you mean 'executor'")]:
        with pytest.raises(RecipeError, match=re.escape(msg)):
            Recipe.from_dict(dict(base, **bad))
