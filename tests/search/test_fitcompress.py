import pytest
import torch
from torch import nn

from obcompress.model import find_layers, weight_groups
from obcompress.search.fitcompress import labelled_batches, run_fitcompress, write_path_report


def _model_and_data():
    torch.manual_seed(0)
    X = torch.randn(256, 16)
    w = torch.randn(16, 4)
    y = (X @ w).argmax(1)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    model.eval()
    return model, X, y


def test_pseudo_labels_and_refusals():
    model, X, y = _model_and_data()
    lab = labelled_batches(model, list(X.split(64)), 128)
    assert len(lab) == 2 and torch.equal(lab[0][1], model(X[:64]).argmax(1))
    own = labelled_batches(model, [(X[:64], y[:64]), (X[64:128], y[64:128])], 128)
    assert torch.equal(own[1][1], y[64:128])
    single = labelled_batches(model, [(X[i:i + 1], y[i:i + 1]) for i in range(3)], 3)
    assert [int(b[1]) for b in single] == y[:3].tolist()  # batches of one keep their own labels
    with pytest.raises(ValueError, match="labelled data"):
        labelled_batches(nn.Linear(16, 1), list(X.split(64)), 64)


def test_run_fitcompress_meets_the_goal_and_leaves_the_model_dense(tmp_path):
    model, X, y = _model_and_data()
    before = [weight_groups(i).clone() for i in find_layers(model).values()]

    def evaluate(m):
        with torch.no_grad():
            return {"accuracy": float((m(X).argmax(1) == y).float().mean())}

    dense = evaluate(model)["accuracy"]
    r = run_fitcompress(model, list(X.split(64)), "size=1/6", evaluate=evaluate, apply=("rtn", "obc"),
                        num_calibration_samples=256, progress=False)
    path = r["path"]
    assert path.reduction >= 6 * (1 - 1e-9)
    assert [s.g for s in path.path] == sorted(s.g for s in path.path)  # a path's length never falls
    assert path.planner == "fitcompress" and path.info["refreshed"]  # the reference's approximate mode
    for how in ("rtn", "obc"):
        assert 0.5 < r["results"][how]["metrics"]["accuracy"] <= 1.0
    # (b) is the OBC solvers on the same configuration: on this easy model it keeps the dense accuracy
    assert r["results"]["obc"]["metrics"]["accuracy"] >= dense - 0.05
    for b, i in zip(before, find_layers(model).values()):
        assert torch.equal(weight_groups(i), b)
    d = write_path_report(path, tmp_path / "rep")
    assert (d / "fit_path.json").exists() and (d / "fit_path.png").read_bytes()[:4] == b"\x89PNG"


def test_one_fisher_and_the_telescoping_variant_still_meet_the_goal():
    model, X, y = _model_and_data()
    r = run_fitcompress(model, list(X.split(64)), "size=1/6", apply=("rtn",), num_calibration_samples=256,
                        refresh_batches=0, progress=False)
    assert r["path"].reduction >= 6 * (1 - 1e-9) and not r["path"].info["refreshed"]
    t = run_fitcompress(model, list(X.split(64)), "size=1/6", apply=("rtn",), num_calibration_samples=256,
                        planner="telescoping", progress=False)
    assert t["path"].planner == "telescoping" and t["path"].reduction >= 6 * (1 - 1e-9)
    with pytest.raises(ValueError, match="planner"):
        run_fitcompress(model, list(X.split(64)), "size=1/6", apply=(), planner="dp", progress=False)


def test_cached_fisher_is_reused_only_for_the_same_weights_and_data(tmp_path):
    from obcompress.search.fitcompress import cached_fisher

    model, X, y = _model_and_data()
    data = [(X[i:i + 64], y[i:i + 64]) for i in range(0, 256, 64)]
    f1, hit1 = cached_fisher(tmp_path / "fisher.safetensors", model, data)
    f2, hit2 = cached_fisher(tmp_path / "fisher.safetensors", model, data)
    assert not hit1 and hit2 and all(torch.equal(f1.diag[n], f2.diag[n]) for n in f1.names)
    assert f1.batches == 4  # the reference's 100 batches, one pass over these four
    _, hit3 = cached_fisher(tmp_path / "fisher.safetensors", model, data[:2])
    with torch.no_grad():
        model[0].weight.add_(0.01)
    _, hit4 = cached_fisher(tmp_path / "fisher.safetensors", model, data[:2])
    assert not hit3 and not hit4


class _WithIdleLayer(nn.Module):
    """A classifier with a layer the loss never reaches (as a BERT pooler under mean pooling)."""

    def __init__(self, body):
        super().__init__()
        self.body = body
        self.idle = nn.Linear(4, 4)

    def forward(self, x):
        return self.body(x)


def test_targets_leave_out_layers_outside_the_loss():
    model, X, y = _model_and_data()
    wrapped = _WithIdleLayer(model)
    data = [(X[i:i + 64], y[i:i + 64]) for i in range(0, 256, 64)]
    with pytest.raises(ValueError, match="took no part in the loss"):
        run_fitcompress(wrapped, data, "size=1/6", apply=(), num_calibration_samples=256, progress=False)
    idle = wrapped.idle.weight.detach().clone()
    r = run_fitcompress(wrapped, data, "size=1/6", apply=("obc",), num_calibration_samples=256, progress=False,
                        targets=["re:body\\..*"])
    assert set(r["path"].choice) == {"body.0", "body.2"}
    assert set(r["path"].recipe()["targets"]) <= {"body.0", "body.2"}
    assert torch.equal(wrapped.idle.weight, idle)


def test_a_given_fisher_is_reused_as_it_is():
    from obcompress.search.fitcompress import estimate_fisher

    model, X, y = _model_and_data()
    data = [(X[i:i + 64], y[i:i + 64]) for i in range(0, 256, 64)]
    fisher = estimate_fisher(model, data)
    own = run_fitcompress(model, data, "size=1/6", apply=(), num_calibration_samples=256, progress=False)
    given = run_fitcompress(model, data, "size=1/6", apply=(), num_calibration_samples=256, progress=False,
                            fisher=fisher)
    assert {n: v.key for n, v in given["path"].choice.items()} == {n: v.key for n, v in own["path"].choice.items()}
    with pytest.raises(ValueError, match="fisher must be a Fisher"):
        run_fitcompress(model, data, "size=1/6", apply=(), progress=False, fisher={"0": torch.ones(3)})


def test_labelled_batches_read_only_what_they_need_and_batch_a_map_style_dataset():
    from torch.utils.data import TensorDataset

    model, X, y = _model_and_data()
    # A map-style Dataset yields single samples: batched first, its own labels kept, 100 samples.
    lab = labelled_batches(model, TensorDataset(X, y), 100)
    assert sum(len(b[1]) for b in lab) == 100
    assert torch.equal(torch.cat([b[1] for b in lab]), y[:100])

    def endless():  # a stream: list() would never return
        while True:
            yield X[:64], y[:64]

    lab = labelled_batches(model, endless(), 96)
    assert [len(b[1]) for b in lab] == [64, 32]
