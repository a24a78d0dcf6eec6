import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from obcompress.search.fisher import empirical_fisher, load_fisher, save_fisher
from obcompress.search.fit_score import fit_perturbation

NAMES = ("a", "b", "c")  # the layers of conftest.Branches


def test_fit_predicts_small_perturbation_loss(trained, mean_loss):
    model, X, Y, _, fisher = trained
    assert fisher.info["per_sample"] == "vmap" and fisher.batches == 15 and fisher.samples == 3000
    # At a minimum of a well-specified model the empirical Fisher approximates the Hessian: check
    # its diagonal against the exact one first.
    params = {n: p.detach() for n, p in model.named_parameters()}
    for name in NAMES:
        def loss_of(w, name=name):
            return F.cross_entropy(torch.func.functional_call(model, {**params, f"{name}.weight": w}, (X,)), Y)

        w = params[f"{name}.weight"]
        h = torch.autograd.functional.hessian(loss_of, w).reshape(w.numel(), -1).diagonal()
        ratio = fisher.diag[name].double().flatten() / h
        assert 0.75 < float(ratio.min()) and float(ratio.max()) < 1.33, name

    base = mean_loss(model, X, Y)
    orig = {n: getattr(model, n).weight.detach().clone() for n in NAMES}
    gen = torch.Generator().manual_seed(1)
    predicted, measured = [], []
    for _ in range(80):
        pert = {n: w + 0.02 * float(torch.rand(1, generator=gen) * 3 + 0.1)
                * torch.randn(w.shape, generator=gen, dtype=w.dtype) for n, w in orig.items()}
        with torch.no_grad():
            for n in NAMES:
                getattr(model, n).weight.copy_(pert[n])
            measured.append(mean_loss(model, X, Y) - base)
            for n in NAMES:
                getattr(model, n).weight.copy_(orig[n])
        predicted.append(0.5 * fit_perturbation(fisher, orig, pert))
    predicted, measured = np.array(predicted), np.array(measured)
    # The diagonal predicts the expected second-order change of a random perturbation (the
    # off-diagonal terms average out), so the means agree and single draws correlate.
    assert 0.8 < measured.mean() / predicted.mean() < 1.25
    assert np.corrcoef(predicted, measured)[0, 1] > 0.9
    assert np.all(measured > 0) and measured.max() < 0.05  # small: the quadratic regime


def test_fisher_modes_match_their_definitions(trained):
    model, X, Y, _, _ = trained
    data = [(X[:7], Y[:7]), (X[7:16], Y[7:16])]
    per = empirical_fisher(model, data, F.cross_entropy, min_batches=2, max_batches=2, mode="per_sample")
    bat = empirical_fisher(model, data, F.cross_entropy, min_batches=2, max_batches=2, mode="batch")
    weights = [getattr(model, n).weight for n in NAMES]
    exact = {n: torch.zeros_like(w) for n, w in zip(NAMES, weights)}
    batch = {n: torch.zeros_like(w) for n, w in zip(NAMES, weights)}
    for x, y in data:
        for i in range(len(x)):
            g = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), weights)
            for n, t in zip(NAMES, g):
                exact[n] += t ** 2 / len(x) / len(data)  # the mean of the per-batch means
        g = torch.autograd.grad(F.cross_entropy(model(x), y), weights)
        for n, t in zip(NAMES, g):
            batch[n] += len(x) * t ** 2 / len(data)
    for n in NAMES:
        torch.testing.assert_close(per.diag[n].double(), exact[n], rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(bat.diag[n].double(), batch[n], rtol=1e-5, atol=1e-9)
        assert per.traces[n] == pytest.approx(float(exact[n].sum()), rel=1e-5)
    assert per.geometries["a"].weights == 24 and per.geometries["c"].cols == 10
    assert per.geometries["b"].positions == 1.0


def test_fisher_converges_and_stops_at_tol(trained):
    model, X, Y, _, _ = trained
    data = [(X[i:i + 16], Y[i:i + 16]) for i in range(0, 1600, 16)]
    f = empirical_fisher(model, data, F.cross_entropy, min_batches=5, max_batches=100, tol=0.15)
    errs = [h["rel_err"] for h in f.history]
    assert errs[0] is None and len(errs) == f.batches
    assert f.converged and errs[-1] < 0.15 and 5 <= f.batches < 100
    # It stopped at the first batch past the minimum under the tolerance.
    assert all(e >= 0.15 for e in errs[4:-1])
    # The relative standard error shrinks as batches accrue (about as 1/sqrt(batches)).
    assert np.mean(errs[1:4]) > errs[-1]
    # A tolerance it cannot meet: it stops at max_batches, cycling the three batches it was given.
    g = empirical_fisher(model, iter(data[:3]), F.cross_entropy, min_batches=2, max_batches=7, tol=1e-6)
    assert not g.converged and g.batches == 7 and g.samples == 7 * 16 and g.info["cycled"]


def test_model_left_unchanged_and_activation_traces(trained):
    model, X, Y, _, _ = trained
    m = copy.deepcopy(model).train()
    m.b.eval()
    m.c.weight.requires_grad_(False)
    m.a.bias.grad = torch.ones_like(m.a.bias)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x, y = X[:12], Y[:12]
    f = empirical_fisher(m, [(x, y), (X[12:20], Y[12:20])], F.cross_entropy, min_batches=2, max_batches=2,
                         activations=True)
    assert m.training and m.a.training and not m.b.training
    assert not m.c.weight.requires_grad and m.a.weight.requires_grad
    assert m.a.weight.grad is None and m.c.weight.grad is None and torch.equal(m.a.bias.grad, torch.ones(4))
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    # Activation trace of layer a: mean over samples of ||d loss_n / d x_n||^2 over its input.
    exact = 0.0
    for xs, ys in ((x, y), (X[12:20], Y[12:20])):
        per = 0.0
        for i in range(len(xs)):
            xi = xs[i:i + 1].clone().requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(m.eval()(xi), ys[i:i + 1]), xi)
            per += float(g[:, :6].pow(2).sum())
        exact += per / len(xs) / 2
    assert f.activation_traces["a"] == pytest.approx(exact, rel=1e-6)
    assert all(v > 0 for v in f.activation_traces.values())


def test_one_pass_and_a_round_trip_on_disk(trained, tmp_path):
    model, X, Y, data, _ = trained
    # cycle=False: at most one pass over data shorter than max_batches (the reference's 100 batches
    # on a calibration set of three), the same estimate as exactly those batches.
    once = empirical_fisher(model, data[:3], F.cross_entropy, min_batches=100, max_batches=100, cycle=False)
    exact = empirical_fisher(model, data[:3], F.cross_entropy, min_batches=3, max_batches=3)
    assert once.batches == 3 and not once.info["cycled"]
    assert all(torch.equal(once.diag[n], exact.diag[n]) for n in NAMES)
    path = save_fisher(once, tmp_path / "f.safetensors", {"data": "abc"})
    back, key = load_fisher(path)
    assert key == {"data": "abc"} and back.names == once.names and back.batches == 3
    assert all(torch.equal(back.diag[n], once.diag[n]) for n in NAMES)
    assert back.geometries == once.geometries and back.history == once.history
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="not a readable Fisher"):
        load_fisher(tmp_path / "junk.safetensors")


def test_bad_input(trained):
    model, X, Y, data, fisher = trained
    with pytest.raises(ValueError, match="labelled"):
        empirical_fisher(model, [X[:10], X[10:20]], F.cross_entropy)
    with pytest.raises(ValueError, match="labelled"):
        empirical_fisher(model, X, F.cross_entropy)
    with pytest.raises(ValueError, match="needs a loss"):
        empirical_fisher(model, data, None)
    with pytest.raises(ValueError, match="targets None"):
        empirical_fisher(model, [(X[:10], None)], F.cross_entropy)
    with pytest.raises(ValueError, match="scalar"):
        empirical_fisher(model, data, lambda out, y: F.cross_entropy(out, y, reduction="none"))
    with pytest.raises(ValueError, match="mode"):
        empirical_fisher(model, data, F.cross_entropy, mode="exact")
    with pytest.raises(ValueError, match="exceeds"):
        empirical_fisher(model, data, F.cross_entropy, min_batches=8, max_batches=4)
    with pytest.raises(ValueError, match="tol"):
        empirical_fisher(model, data, F.cross_entropy, tol=0)
    with pytest.raises(ValueError, match="empty"):
        empirical_fisher(model, [], F.cross_entropy)
