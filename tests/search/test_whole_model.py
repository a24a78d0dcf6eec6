import copy
import json
import struct

import pytest
import torch
from torch import nn

from obcompress.api import compress
from obcompress.formats import save
from obcompress.search import SearchSpace, Variant
from obcompress.search.costs import make_cost
from obcompress.search.database import build_database
from obcompress.search.nonuniform import parse_goal, select_dp
from obcompress.search.whole_model import WholeModel, layer_positions
from obcompress.model import find_layers


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 8, 3, padding=1)      # 3x3 inputs, "same": 9 output positions
        self.bn = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8 * 9, 32)                  # the largest layer, left out of the search
        self.fc2 = nn.Linear(32, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


SPACE = SearchSpace((Variant("unstructured", 0.5), Variant(bits=8), Variant(bits=4), Variant(bits=2),
                     Variant("unstructured", 0.5, 4)), joint_min_cols=8)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    model = Net().eval()
    data = [(torch.randn(64, 2, 3, 3), torch.zeros(64)) for _ in range(2)]
    db = build_database(model, data, tmp_path_factory.mktemp("db"), SPACE, num_calibration_samples=128,
                        ignore=["fc1"], progress=False)
    return model, data, db


def _tensor_bytes(safetensors_file):
    # The tensor data of a safetensors file: its size less the 8-byte length and the JSON header.
    blob = safetensors_file.read_bytes()
    return len(blob) - 8 - struct.unpack("<Q", blob[:8])[0]


def test_whole_model_size_is_the_artifacts_tensor_bytes(setup, tmp_path):
    model, data, db = setup
    assert db.names == ["conv", "fc2"]
    cfg = select_dp(db, parse_goal("size=1/8"))
    whole = WholeModel(cfg.goal.cost, model, db.names).of(cfg.cost, cfg.dense_cost)
    assert whole.searched_reduction == pytest.approx(cfg.reduction) and cfg.reduction >= 8
    # fc1 (72 x 32 floats) is most of the model: the whole model is far less reduced than the goal says
    assert whole.reduction < 2.5
    m = copy.deepcopy(model)
    result = compress(m, cfg.recipe(db), data, num_calibration_samples=128, progress=False)
    save(m, result, tmp_path / "art")
    assert whole.cost == 8 * _tensor_bytes(tmp_path / "art" / "model.safetensors")
    floats = sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())
    ints = sum(8 * t.numel() for t in model.state_dict().values() if not t.is_floating_point())
    assert whole.dense_cost == 8 * (4 * floats + ints)


def test_whole_model_bops_count_the_layers_outside_the_search_dense(setup):
    model, data, db = setup
    batches = [x for x, _ in data]
    positions = layer_positions(model, find_layers(model), batches)
    assert positions == {"conv": 9.0, "fc1": 1.0, "fc2": 1.0}
    for goal in ("bops=1/8", "flops=1/2"):
        cfg = select_dp(db, parse_goal(goal))
        whole = WholeModel(cfg.goal.cost, model, db.names, batches).of(cfg.cost, cfg.dense_cost)
        fc1 = 72 * 32 * (16 * 16 if goal.startswith("bops") else 1)  # MACs of fc1, float 16 x 16 bits each
        assert whole.cost == pytest.approx(cfg.cost + fc1) and whole.dense_cost == pytest.approx(cfg.dense_cost + fc1)
        assert whole.reduction < whole.searched_reduction
    with pytest.raises(ValueError, match="calibration batches"):
        WholeModel(make_cost("bops"), model, db.names)
    with pytest.raises(ValueError, match="not compressible layers"):
        WholeModel(make_cost("size"), model, ["bn"])
    # nothing outside the search: the two figures agree for a cost of layers only
    w = WholeModel(make_cost("flops"), model, ["conv", "fc1", "fc2"])
    assert w.of(10.0, 40.0).reduction == 4.0


def test_sweep_records_both_ratios_for_every_cost(setup, tmp_path):
    from obcompress.search.sweep import read_sweep, run_sweep, sweep_table

    model, data, db = setup

    def evaluate(m):
        with torch.no_grad():
            return {"accuracy": float(m(data[0][0]).softmax(1).max(1).values.mean())}

    run_sweep(db, model, data, evaluate, ["size=1/8", "bops=1/8"], tmp_path, methods=("uniform", "dp"),
              num_calibration_samples=128, progress=False, log=lambda s: None)
    doc = read_sweep(tmp_path)
    for r in doc["runs"]:
        own = r["goal"]["cost"]["name"]
        assert set(r["reductions"]) == {"size", "bops"}
        assert r["reductions"][own]["searched"] == pytest.approx(r["reduction"])
        assert r["whole_model"]["whole_reduction"] == pytest.approx(r["reductions"][own]["whole"])
        assert r["reductions"][own]["whole"] < r["reduction"]
        w = doc["whole_model"][own]
        rest, dense = w["rest"], w["searched_dense_cost"]
        assert r["reductions"][own]["whole"] == pytest.approx((rest + dense) / (rest + dense / r["reduction"]))
    assert doc["whole_model"]["size"]["outside"] == ["fc1"]
    table = sweep_table(doc)
    assert "searched layers" in table and "whole model" in table
    row = next(line for line in table.splitlines() if line.startswith("size 8x") and " dp " in line)
    run = next(r for r in doc["runs"] if r["method"] == "dp" and r["goal"]["cost"]["name"] == "size")
    assert f"{run['reduction']:.2f}x" in row and f"{run['whole_model']['whole_reduction']:.2f}x" in row
    json.dumps(doc)  # plain JSON all through
