import copy

import pytest
import torch
import torch.nn.functional as F

from obcompress.api import compress
from obcompress.search.database import build_database
from obcompress.search.fisher import empirical_fisher
from obcompress.search.fit_score import fit_masks, fit_noise, fit_perturbation, fit_score_kind, fit_scores
from obcompress.search.nonuniform import parse_goal, select_dp
from obcompress.search.space import SearchSpace, Variant
from obcompress.solvers.grid import QuantGrid

NAMES = ("a", "b", "c")


def test_fit_noise_definition(trained):
    model, _, _, _, fisher = trained
    assert fit_noise(fisher, {"a": Variant()}, model) == 0.0
    Fa, Wa = fisher.diag["a"].double(), model.a.weight.detach().double()
    # FIT's noise model: the tensor's range over 2^b - 1 levels, Delta^2 / 12 per kept weight.
    step = (float(Wa.max()) - float(Wa.min())) / 15
    assert fit_noise(fisher, {"a": Variant(bits=4)}, model) == pytest.approx(float(Fa.sum()) * step ** 2 / 12, rel=1e-9)
    # The telescoping planner's: one step per output channel, and the zero bin.
    delta = QuantGrid.fit(Wa.float(), 4).scale.double()  # (rows, 1)
    uniform = float((Fa * delta ** 2 / 12).sum())
    assert fit_noise(fisher, {"a": Variant(bits=4)}, model, delta="channel") == pytest.approx(uniform, rel=1e-9)
    rtn = torch.where(Wa.abs() < delta / 2, Wa ** 2, delta ** 2 / 12)
    assert fit_noise(fisher, {"a": Variant(bits=4)}, model, delta="channel", zero_bin=True) == pytest.approx(
        float((Fa * rtn).sum()), rel=1e-9)
    # Half of layer a pruned by F theta^2: those weights count theta^2, the kept ones their noise.
    imp = Fa * Wa ** 2
    pruned = imp.flatten().argsort()[:12]
    keep = torch.ones(24, dtype=torch.bool)
    keep[pruned] = False
    keep = keep.reshape(4, 6)
    assert torch.equal(fit_masks(fisher, model, {"a": 0.5})["a"], keep)
    want = float(imp[~keep].sum() + Fa[keep].sum() * step ** 2 / 12)
    assert fit_noise(fisher, {"a": Variant("unstructured", 0.5, 4)}, model) == pytest.approx(want, rel=1e-9)
    assert fit_noise(fisher, {"a": Variant("unstructured", 0.5)}, model) == pytest.approx(float(imp[~keep].sum()))
    # The perturbation form of the pruned-only layer is the same sum.
    pruned_w = {n: getattr(model, n).weight.detach() * (fit_masks(fisher, model, {"a": 0.5})["a"] if n == "a" else 1)
                for n in NAMES}
    assert fit_perturbation(fisher, model, pruned_w) == pytest.approx(float(imp[~keep].sum()), rel=1e-9)
    # A global mask ranks all layers together; each layer's share, given as its own level, is the same mask.
    g = fit_masks(fisher, model, 0.6)
    assert sum(int((~m).sum()) for m in g.values()) == round(0.6 * 96)
    levels = {n: float((~g[n]).sum()) / g[n].numel() for n in NAMES}
    assert all(torch.equal(fit_masks(fisher, model, levels)[n], g[n]) for n in NAMES)
    cut = torch.cat([(fisher.diag[n].double() * getattr(model, n).weight.detach().double() ** 2).flatten()[~g[n].flatten()]
                     for n in NAMES]).max()
    kept = torch.cat([(fisher.diag[n].double() * getattr(model, n).weight.detach().double() ** 2).flatten()[g[n].flatten()]
                      for n in NAMES]).min()
    assert cut <= kept


def test_fit_scores_of_an_obc_database(tmp_path):
    """Every variant's score is sum F (theta - theta_hat)^2 over the weights the database puts into
    the model, summed in the weights' own shapes (convs, a depthwise conv's groups)."""
    from test_database import Toy

    torch.manual_seed(0)
    model = Toy()
    data = [(torch.randn(32, 3, 4, 4), torch.randint(0, 4, (32,))) for _ in range(2)]
    space = SearchSpace((Variant("unstructured", 0.5), Variant(bits=4), Variant("2:4", bits=4),
                         Variant("unstructured", 0.5, 3)), joint_min_cols=8)
    db = build_database(model, data, tmp_path / "db", space, num_calibration_samples=64, progress=False)
    fisher = empirical_fisher(model, data, F.cross_entropy, min_batches=2, max_batches=2)
    kind = fit_scores(db, model, fisher, progress=False)
    assert kind == fit_score_kind(fisher) and kind.startswith("fit_")
    for name in db.names:
        w = dict(model.named_modules())[name].weight.detach()
        for key, rec in db.layers[name].variants.items():
            m = copy.deepcopy(model)
            db.apply(m, {name: key})
            w_hat = dict(m.named_modules())[name].weight.detach()
            want = float((fisher.diag[name].double() * (w.double() - w_hat.double()) ** 2).sum())
            assert rec[kind] == pytest.approx(want, rel=1e-5, abs=1e-12), (name, key)
    # The same as the perturbation of the weights compress gives for the variant's recipe.
    m = copy.deepcopy(model)
    compress(m, db.recipe({"fc1": "s0.5000+w3"}), [x for x, _ in data], num_calibration_samples=64, progress=False)
    sub = {n: (m if n == "fc1" else model) for n in db.names}
    moved = {n: dict(sub[n].named_modules())[n].weight for n in db.names}
    assert db.layers["fc1"].variants["s0.5000+w3"][kind] == pytest.approx(fit_perturbation(fisher, model, moved),
                                                                          rel=1e-4)
    # Stored beside the database, tied to this Fisher: read back, not recomputed.
    again = build_database(model, data, tmp_path / "db", space, num_calibration_samples=64, progress=False)
    assert all(kind in rec for e in again.layers.values() for rec in e.variants.values())
    again.weights = None  # would fail if anything were recomputed
    assert fit_scores(again, model, fisher, progress=False) == kind
    # The DP sums them.
    cfg = select_dp(db, parse_goal("size=1/6"), score=kind)
    assert cfg.score == pytest.approx(sum(db.layers[n].variants[v.key][kind] for n, v in cfg.choice.items()))
    # Another Fisher, other scores.
    other = empirical_fisher(model, data[:1] * 2, F.cross_entropy, min_batches=2, max_batches=2)
    assert fit_score_kind(other) != kind
    with pytest.raises(ValueError, match="has no layer"):
        fit_scores(db, model, fisher, prefix="body.", progress=False)


def test_bad_input(trained):
    model, X, Y, data, fisher = trained
    with pytest.raises(ValueError, match="shape"):
        fit_noise(fisher, {"a": Variant(bits=4)}, {"a": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="no Fisher"):
        fit_noise(fisher, {"zz": Variant(bits=4)}, {"zz": torch.zeros(4, 6)})
    with pytest.raises(ValueError, match="unstructured"):
        fit_noise(fisher, {"a": Variant("2:4", bits=4)}, model)
    with pytest.raises(ValueError, match="delta"):
        fit_noise(fisher, {"a": Variant(bits=4)}, model, delta="row")
    with pytest.raises(ValueError, match="sparsity"):
        fit_masks(fisher, model, 1.0)
