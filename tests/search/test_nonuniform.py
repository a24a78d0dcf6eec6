import copy
import itertools

import pytest
import torch
from torch import nn

from obcompress.api import compress
from obcompress.model import find_layers, weight_groups
from obcompress.search import SearchSpace, Variant
from obcompress.search.costs import make_cost, model_totals
from obcompress.search.database import build_database, load_database
from obcompress.search.nonuniform import (
    CalibrationLoss, best_uniform, layer_loss_scores, parse_goal, select_dp, spdy, stitched_loss, uniform_configs,
)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8 * 9, 16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


SPACE = SearchSpace((
    Variant("unstructured", 0.5), Variant("unstructured", 0.75), Variant("2:4"),
    Variant(bits=8), Variant(bits=4), Variant(bits=2), Variant("2:4", bits=4), Variant("unstructured", 0.5, 4),
), joint_min_cols=8)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    model = Net().eval()
    data = [(torch.randn(64, 2, 3, 3), torch.zeros(64)) for _ in range(2)]
    db = build_database(model, data, tmp_path_factory.mktemp("db"), SPACE, num_calibration_samples=128,
                        progress=False)
    return model, data, db


def test_goal_parsing_and_errors(setup):
    _, _, db = setup
    g = parse_goal("bops=1/8")
    assert g.fraction == 0.125 and g.reduction == 8 and g.cost.name == "bops"
    assert parse_goal("size=0.25").cost.name == "size"
    for bad in ("bops", "bops=8", "bops=0", "bops=-1/4", "bops=x", "speed=1/2"):
        with pytest.raises(ValueError):
            parse_goal(bad)
    with pytest.raises(ValueError, match="cannot be reached"):
        select_dp(db, parse_goal("size=1/1000"))


def test_dp_is_feasible_and_optimal_against_brute_force(setup):
    _, _, db = setup
    for text in ("bops=1/6", "size=1/5", "flops=1/2"):
        goal = parse_goal(text)
        cfg = select_dp(db, goal, buckets=5000)
        geoms = db.geometries
        assert cfg.cost == pytest.approx(model_totals(goal.cost, geoms, cfg.choice))
        assert cfg.cost <= goal.fraction * cfg.dense_cost * (1 + 1e-12)
        exact = select_dp(db, goal, exact=True)
        # brute force over every configuration (3 layers)
        opts = [db.options(n) for n in db.names]
        best = min(
            (sum(db.layers[n].score(v.key) for n, v in zip(db.names, combo)), combo)
            for combo in itertools.product(*opts)
            if model_totals(goal.cost, geoms, dict(zip(db.names, combo))) <= goal.fraction * cfg.dense_cost
        )
        assert exact.score == pytest.approx(best[0], rel=1e-9, abs=1e-12)
        assert cfg.score >= exact.score - 1e-12
        # the DP's rounding bound: no worse than the optimum at budget - slack
        tighter = min(
            (sum(db.layers[n].score(v.key) for n, v in zip(db.names, combo)))
            for combo in itertools.product(*opts)
            if model_totals(goal.cost, geoms, dict(zip(db.names, combo)))
            <= goal.fraction * cfg.dense_cost - cfg.info["slack"]
        )
        assert cfg.score <= tighter + 1e-12


def test_uniform_baselines(setup):
    _, _, db = setup
    cost = make_cost("size")
    ucs = uniform_configs(db, cost)
    assert {c.info["variant"] for c in ucs} == {v.key for v in SPACE.variants}
    # the 9-column conv takes 2:4's fallback: unstructured at the nearest level with the same bits
    u24 = next(c for c in ucs if c.info["variant"] == "2:4+w4")
    assert u24.choice["conv"].key == "s0.5000+w4" and u24.choice["fc1"].key == "2:4+w4"
    goal = parse_goal("size=1/6")
    best = best_uniform(db, goal, top=2)
    assert all(c.cost <= goal.fraction * c.dense_cost for c in best)
    assert select_dp(db, goal).score <= best[0].score + 1e-12


def test_recipe_from_a_configuration_is_what_compress_applies(setup):
    model, data, db = setup
    cfg = select_dp(db, parse_goal("bops=1/10"))
    m1, m2 = copy.deepcopy(model), copy.deepcopy(model)
    db.apply(m1, cfg.choice)
    compress(m2, cfg.recipe(db), data, num_calibration_samples=128, progress=False)
    f1, f2 = find_layers(m1), find_layers(m2)
    for n in db.names:
        torch.testing.assert_close(weight_groups(f1[n]), weight_groups(f2[n]), rtol=1e-4, atol=1e-5)


def test_spdy_never_worse_than_the_dp_and_leaves_the_model_dense(setup):
    model, data, db = setup
    before = {n: weight_groups(i).clone() for n, i in find_layers(model).items()}
    goal = parse_goal("bops=1/12")
    cfg = spdy(db, model, data, goal, num_samples=128, restarts=3, steps=6, progress=False)
    assert cfg.cost <= goal.fraction * cfg.dense_cost * (1 + 1e-12)
    assert cfg.info["calibration_loss"] <= cfg.info["dp_loss"]
    assert cfg.info["history"] == sorted(cfg.info["history"], reverse=True)
    for n, i in find_layers(model).items():
        assert torch.equal(weight_groups(i), before[n])
    # the reported loss is the stitched model's measured loss
    assert stitched_loss(db, model, data, cfg, num_samples=128) == pytest.approx(cfg.info["calibration_loss"], rel=1e-6)


def test_calibration_loss_and_loss_scores(setup):
    model, data, db = setup
    batches = [x for x, _ in data]
    loss = CalibrationLoss(model, batches)
    assert loss.kind == "kl" and loss() == pytest.approx(0.0, abs=1e-9)
    scores = layer_loss_scores(db, model, data, num_samples=128, variants=["w2", "w8"], progress=False)
    for n in db.names:
        assert scores[n]["dense"] == 0.0
        assert scores[n]["w2"] >= scores[n]["w8"] >= 0.0
    # stored in the database: reloaded, and the DP can use them (over the scored variants only)
    again = load_database(db.directory, model)
    assert again.layers["fc1"].variants["w2"]["calibration_loss"] == scores["fc1"]["w2"]
    cfg = select_dp(again, parse_goal("bops=1/4"), score="calibration_loss")
    assert {v.key for v in cfg.choice.values()} <= {"dense", "w2", "w8"}
    # a second call finds them stored and measures nothing
    assert layer_loss_scores(again, model, data, num_samples=128, variants=["w2", "w8"], progress=False) == scores
    with pytest.raises(ValueError):
        CalibrationLoss(model, batches, kind="l1")


def test_loss_scores_with_the_prefix_replayed_equal_full_passes(setup):
    model, data, db = setup
    full = layer_loss_scores(db, model, data, num_samples=128, progress=False, save=False, replay=False)
    replayed = layer_loss_scores(db, model, data, num_samples=128, progress=False, save=False)
    assert replayed == full and len(full["fc2"]) == len(db.options("fc2"))


def test_variants_without_a_finite_score_are_not_offered(setup):
    _, _, db = setup
    e = db.layers["fc1"]
    saved = e.variants["w2"]["error"]
    e.variants["w2"]["error"] = float("inf")
    try:
        for g in ("bops=1/12", "size=1/8"):
            assert select_dp(db, parse_goal(g)).choice["fc1"].key != "w2"
        assert all(c.choice["fc1"].key != "w2" for c in uniform_configs(db, make_cost("bops")))
    finally:
        e.variants["w2"]["error"] = saved


def test_sweep_with_statistics_correction_is_what_compress_reproduces(setup, tmp_path):
    import yaml

    from obcompress.search.sweep import run_sweep

    model, data, db = setup
    dense_bn = copy.deepcopy(model.bn.state_dict())

    def evaluate(m):
        with torch.no_grad():
            return {"accuracy": float(m(data[0][0]).sum())}  # any deterministic number of the model

    doc = run_sweep(db, model, data, evaluate, ["bops=1/10"], tmp_path, methods=("dp",), correction="statcorr",
                    num_calibration_samples=128, progress=False, log=lambda s: None)
    recipe = yaml.safe_load((tmp_path / doc["runs"][0]["recipe"]).read_text())
    assert recipe["corrections"] == {"statistics_correction": True}
    # the model is left dense, BatchNorm included; compress with the written recipe gives the model evaluated
    assert all(torch.equal(v, dense_bn[k]) for k, v in model.bn.state_dict().items())
    m = copy.deepcopy(model)
    compress(m, recipe, data, num_calibration_samples=128, progress=False)
    assert evaluate(m)["accuracy"] == pytest.approx(doc["runs"][0]["metrics"]["accuracy"], rel=1e-4)
    with pytest.raises(ValueError, match="no BatchNorm, GroupNorm or LayerNorm"):
        run_sweep(db, nn.Sequential(nn.Linear(2, 2)), data, evaluate, ["bops=1/10"], tmp_path / "x",
                  methods=("dp",), correction="statcorr", progress=False)


def test_bops_sweep_evaluates_with_the_input_quantizers_its_recipe_has(setup, tmp_path):
    import yaml

    from obcompress.search.sweep import run_sweep

    model, data, db = setup
    x = data[0][0]

    def evaluate(m):
        with torch.no_grad():
            return {"accuracy": float(m(x).double().sum())}

    doc = run_sweep(db, model, data, evaluate, ["bops=1/10"], tmp_path, methods=("dp",), activation_bits=4,
                    num_calibration_samples=128, progress=False, log=lambda s: None)
    run = doc["runs"][0]
    recipe = yaml.safe_load((tmp_path / run["recipe"]).read_text())
    assert any((e.get("quantization") or {}).get("activations") for e in recipe["layers"].values())
    m = copy.deepcopy(model)
    res = compress(m, recipe, data, num_calibration_samples=128, progress=False)
    assert res.activation_hooks is not None
    assert evaluate(m)["accuracy"] == pytest.approx(run["metrics"]["accuracy"], rel=1e-5)
    res.activation_hooks.remove()
    assert evaluate(m)["accuracy"] != pytest.approx(run["metrics"]["accuracy"], rel=1e-5)  # 4-bit inputs matter
    assert not any(mod._forward_pre_hooks for mod in model.modules())  # the sweep's own hooks are gone


def test_max_layer_error_leaves_out_variants_above_it(setup):
    _, _, db = setup
    goal = parse_goal("size=1/5")
    geoms = db.geometries
    errors = sorted({rec["error"] for e in db.layers.values() for rec in e.variants.values()})
    cap = errors[len(errors) // 2]  # about half of the variants are over it
    # A FIT-like score that favours the variants of large error (its order is the reverse of theirs).
    for e in db.layers.values():
        for rec in e.variants.values():
            rec["fit_test"] = 1.0 - rec["error"]
    try:
        for score, limit, expect in (("fit_test", cap, cap), ("error", cap, cap), ("error", "auto", None),
                                     ("fit_test", None, None)):
            cfg = select_dp(db, goal, score=score, exact=True, max_layer_error=limit)
            assert cfg.info["max_layer_error"] == expect
            bound = float("inf") if expect is None else expect
            opts = [[v for v in db.options(n) if db.layers[n].variants[v.key]["error"] <= bound] for n in db.names]
            best = min(sum(db.layers[n].score(v.key, score) for n, v in zip(db.names, combo))
                       for combo in itertools.product(*opts)
                       if model_totals(goal.cost, geoms, dict(zip(db.names, combo))) <= goal.fraction * cfg.dense_cost)
            assert cfg.score == pytest.approx(best, rel=1e-9, abs=1e-12)
            assert all(db.layers[n].variants[v.key]["error"] <= bound for n, v in cfg.choice.items())
        # "auto" caps FIT scores at FIT_MAX_LAYER_ERROR.
        from obcompress.search.nonuniform import FIT_MAX_LAYER_ERROR

        assert select_dp(db, goal, score="fit_test").info["max_layer_error"] == FIT_MAX_LAYER_ERROR
        with pytest.raises(ValueError, match="max_layer_error"):
            select_dp(db, goal, max_layer_error=-1)
        with pytest.raises(ValueError, match="cannot be reached"):
            select_dp(db, parse_goal("size=1/30"), score="fit_test", max_layer_error=1e-12)
    finally:
        for e in db.layers.values():
            for rec in e.variants.values():
                rec.pop("fit_test", None)
