import copy
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from obcompress.search.fit import (
    DEFAULT_SPARSITY, apply_rtn_fit, empirical_fisher, finetune, fit_masks, fit_noise, fit_perturbation,
    fit_recipe, plan_path,
)
from obcompress.search.nonuniform import Configuration, parse_goal
from obcompress.search.space import Variant
from obcompress.solvers.grid import QuantGrid


class Branches(nn.Module):
    """Multinomial logistic regression whose logits are the sum of three linear layers on three
    slices of the input: convex, so it trains to its minimum in a few L-BFGS steps, and, fitted to
    labels drawn from a model of the same form, the empirical Fisher there approximates the Hessian."""

    SPLIT = (6, 8, 10)

    def __init__(self):
        super().__init__()
        a, b, c = self.SPLIT
        self.a = nn.Linear(a, 4)
        self.b = nn.Linear(b, 4, bias=False)
        self.c = nn.Linear(c, 4, bias=False)

    def forward(self, x):
        a, b, _ = self.SPLIT
        return self.a(x[:, :a]) + self.b(x[:, a:a + b]) + self.c(x[:, a + b:])


NAMES = ("a", "b", "c")


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    teacher = Branches().double()
    with torch.no_grad():
        for p in teacher.parameters():
            p.mul_(3)
    X = torch.randn(3000, sum(Branches.SPLIT), dtype=torch.float64)
    with torch.no_grad():
        Y = torch.multinomial(F.softmax(teacher(X), -1), 1).squeeze(1)
    model = copy.deepcopy(teacher)
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=60, tolerance_grad=1e-10, tolerance_change=0,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(X), Y)
        loss.backward()
        return loss

    opt.step(closure)
    for p in model.parameters():
        p.grad = None
    g = torch.autograd.grad(F.cross_entropy(model(X), Y), list(model.parameters()))
    assert max(float(t.abs().max()) for t in g) < 1e-6  # at the minimum: the quadratic regime holds there
    data = [(X[i:i + 200], Y[i:i + 200]) for i in range(0, len(X), 200)]
    fisher = empirical_fisher(model, data, F.cross_entropy, min_batches=len(data), max_batches=len(data), tol=1e-9,
                              mode="per_sample")
    return model, X, Y, data, fisher


def _loss(model, X, Y):
    with torch.no_grad():
        return float(F.cross_entropy(model(X), Y))


# ---------------------------------------------------------------------------------------------
# Fisher


def test_fit_predicts_small_perturbation_loss(trained):
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

    base = _loss(model, X, Y)
    orig = {n: getattr(model, n).weight.detach().clone() for n in NAMES}
    gen = torch.Generator().manual_seed(1)
    predicted, measured = [], []
    for _ in range(80):
        pert = {n: w + 0.02 * float(torch.rand(1, generator=gen) * 3 + 0.1)
                * torch.randn(w.shape, generator=gen, dtype=w.dtype) for n, w in orig.items()}
        with torch.no_grad():
            for n in NAMES:
                getattr(model, n).weight.copy_(pert[n])
            measured.append(_loss(model, X, Y) - base)
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


# ---------------------------------------------------------------------------------------------
# FIT


def test_fit_noise_definition(trained):
    model, _, _, _, fisher = trained
    assert fit_noise(fisher, {"a": Variant()}, model) == 0.0
    Fa, Wa = fisher.diag["a"].double(), model.a.weight.detach().double()
    delta = QuantGrid.fit(Wa.float(), 4).scale.double()  # (rows, 1): one step per output channel
    uniform = float((Fa * delta ** 2 / 12).sum())
    assert fit_noise(fisher, {"a": Variant(bits=4)}, model, zero_bin=False) == pytest.approx(uniform, rel=1e-9)
    rtn = torch.where(Wa.abs() < delta / 2, Wa ** 2, delta ** 2 / 12)
    assert fit_noise(fisher, {"a": Variant(bits=4)}, model) == pytest.approx(float((Fa * rtn).sum()), rel=1e-9)
    # Half of layer a pruned by F theta^2: those weights count theta^2, the kept ones their noise.
    imp = Fa * Wa ** 2
    pruned = imp.flatten().argsort()[:12]
    keep = torch.ones(24, dtype=torch.bool)
    keep[pruned] = False
    keep = keep.reshape(4, 6)
    assert torch.equal(fit_masks(fisher, model, {"a": 0.5})["a"], keep)
    want = float(imp[~keep].sum() + (Fa * rtn)[keep].sum())
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


BITS = (8, 4, 2)
LEVELS = (0.0, 0.5, 0.9)


def _configs(fisher, model, per_layer):
    """Every state of the tiny space as (bit indices, sparsity index/indices, choice)."""
    sizes = {n: getattr(model, n).weight.numel() for n in NAMES}
    out = []
    for b in itertools.product(range(3), repeat=3):
        if per_layer:
            for s in itertools.product(range(3), repeat=3):
                counts = {n: min(math.floor(LEVELS[i] * sizes[n] + 0.5), sizes[n] - 1) for n, i in zip(NAMES, s)}
                out.append((b, s, counts))
        else:
            for s in range(3):
                m = fit_masks(fisher, model, LEVELS[s], max_layer_sparsity=LEVELS[-1])
                out.append((b, s, {n: int((~m[n]).sum()) for n in NAMES}))
    configs = []
    for b, s, counts in out:
        choice = {n: Variant("unstructured", counts[n] / sizes[n], BITS[i]) for n, i in zip(NAMES, b)}
        configs.append((b, s, choice))
    return configs


def _evaluate(fisher, model, goal, configs, zero_bin=True):
    dense = sum(goal.cost.dense(fisher.geometries[n]) for n in NAMES)
    out = {}
    for b, s, choice in configs:
        cost = sum(goal.cost(fisher.geometries[n], choice[n]) for n in NAMES)
        out[(b, s)] = (fit_noise(fisher, choice, model, zero_bin=zero_bin), cost, choice)
    return out, dense


def _moves(key, per_layer):
    b, s = key
    for l in range(3):
        if b[l] < 2:
            yield (b[:l] + (b[l] + 1,) + b[l + 1:], s)
    if per_layer:
        for l in range(3):
            if s[l] < 2:
                yield (b, s[:l] + (s[l] + 1,) + s[l + 1:])
    elif s < 2:
        yield (b, s + 1)


@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("goal_text", ["size=0.3", "bops=1/20"])
def test_astar_finds_the_least_fit_configuration(trained, per_layer, goal_text):
    model, _, _, _, fisher = trained
    goal = parse_goal(goal_text)
    table, dense = _evaluate(fisher, model, goal, _configs(fisher, model, per_layer))
    # FIT never decreases along a move: what makes the path length telescope.
    for key, (fit, _, _) in table.items():
        assert all(table[n][0] >= fit - 1e-12 for n in _moves(key, per_layer))
    feasible = [v for v in table.values() if v[1] <= goal.fraction * dense]
    assert 0 < len(feasible) < len(table)
    best = min(v[0] for v in feasible)
    kw = dict(bits=BITS, sparsity=LEVELS, per_layer_sparsity=per_layer)
    p = plan_path(fisher, model, None, goal, lam=0.0, **kw)
    assert p.fit == pytest.approx(best, rel=1e-9)
    assert p.cost <= goal.fraction * dense and p.g == pytest.approx(p.fit - p.path[0].fit, rel=1e-9)
    assert fit_noise(fisher, p.choice, model) == pytest.approx(p.fit, rel=1e-9)
    # The reference heuristic is not a lower bound: still a feasible answer, no better than the optimum.
    q = plan_path(fisher, model, None, goal, lam=1.0, **kw)
    assert q.cost <= goal.fraction * dense and q.fit >= best * (1 - 1e-9)


def test_astar_least_path_length_without_zero_bin(trained):
    model, _, _, _, fisher = trained
    goal = parse_goal("bops=1/20")
    table, dense = _evaluate(fisher, model, goal, _configs(fisher, model, False), zero_bin=False)
    # Shortest Fisher length to every state, by relaxing the moves in order of depth.
    dist = {((0, 0, 0), 0): 0.0}
    for key in sorted(table, key=lambda k: sum(k[0]) + k[1]):
        for nxt in _moves(key, False):
            d = dist[key] + abs(table[nxt][0] - table[key][0])
            dist[nxt] = min(dist.get(nxt, math.inf), d)
    best = min(dist[k] for k, v in table.items() if v[1] <= goal.fraction * dense)
    p = plan_path(fisher, model, None, goal, bits=BITS, sparsity=LEVELS, lam=0.0, zero_bin=False)
    assert p.g == pytest.approx(best, rel=1e-9, abs=1e-15)


def test_beam_of_one_is_the_greedy_walk(trained):
    model, _, _, _, fisher = trained
    goal = parse_goal("bops=1/20")
    table, dense = _evaluate(fisher, model, goal, _configs(fisher, model, False))
    budget = goal.fraction * dense
    lam = 1.0
    key, g, walk = ((0, 0, 0), 0), 0.0, [((0, 0, 0), 0)]
    while table[key][1] > budget:
        def priority(n):
            fit, cost, _ = table[n]
            return g + abs(fit - table[key][0]) + lam * fit * max(0.0, cost - budget) / dense
        nxt = min(_moves(key, False), key=priority)
        g += abs(table[nxt][0] - table[key][0])
        key = nxt
        walk.append(key)
    p = plan_path(fisher, model, None, goal, bits=BITS, sparsity=LEVELS, lam=lam, mode="beam", beam_width=1)
    assert [({n: s.bits[n] for n in NAMES}, s.sparsity) for s in p.path] == [
        ({n: BITS[i] for n, i in zip(NAMES, b)}, LEVELS[s]) for b, s in walk]
    assert p.g == pytest.approx(g) and p.expansions == len(walk) - 1
    assert p.choice == table[key][2]
    # A beam wider than any depth's states is breadth-first: the least FIT among the goal states of
    # the least depth (moves taken) that has one.
    depth = {k: sum(k[0]) + k[1] for k in table}
    first = min(depth[k] for k, v in table.items() if v[1] <= budget)
    wide = plan_path(fisher, model, None, goal, bits=BITS, sparsity=LEVELS, lam=lam, mode="beam", beam_width=81)
    assert len(wide.path) == first + 1
    assert wide.fit == pytest.approx(min(v[0] for k, v in table.items() if v[1] <= budget and depth[k] == first))


def test_path_report_refresh_and_recipe(trained):
    model, _, _, _, fisher = trained
    goal = parse_goal("size=0.3")
    calls = []

    def refresh(step):
        calls.append(step)
        return fisher

    p = plan_path(fisher, model, None, goal, bits=BITS, sparsity=LEVELS, lam=0.0)
    r = plan_path(fisher, model, None, goal, bits=BITS, sparsity=LEVELS, lam=0.0, refresh=refresh)
    assert len(calls) == r.expansions and r.choice == p.choice and r.fit == pytest.approx(p.fit)
    assert all(set(s.choice) == set(NAMES) for s in calls)
    first, last = p.path[0], p.path[-1]
    assert first.g == 0 and all(b == 8 for b in first.bits.values()) and first.sparsity == 0.0
    assert last.choice == p.choice and last.fraction == pytest.approx(p.cost / p.dense_cost)
    assert [s.g for s in p.path] == sorted(s.g for s in p.path)
    assert all(b.cost <= a.cost for a, b in zip(p.path, p.path[1:]))
    assert p.reduction == pytest.approx(p.dense_cost / p.cost) and p.to_dict()["path"][0]["g"] == 0
    conf = p.configuration()
    assert isinstance(conf, Configuration) and conf.score == p.fit and conf.choice == p.choice
    rec = fit_recipe(p.choice, activation_bits=8)
    compressed = [n for n in NAMES if p.choice[n] != Variant()]
    assert rec["solver"] == "exact" and rec["targets"] == compressed
    assert rec["layers"] == {n: p.choice[n].recipe_entry(8) for n in compressed}
    # A goal already met at the start: nothing to expand.
    easy = plan_path(fisher, model, None, "bops=1/2", bits=BITS, sparsity=LEVELS)
    assert easy.expansions == 0 and len(easy.path) == 1
    # The default schedules: 40 levels from 0 to 0.99.
    assert len(DEFAULT_SPARSITY) == 40 and DEFAULT_SPARSITY[0] == 0 and DEFAULT_SPARSITY[-1] == pytest.approx(0.99)


def test_apply_rtn_fit_and_finetune(trained):
    model, X, Y, data, fisher = trained
    m = copy.deepcopy(model)
    choice = {"a": Variant("unstructured", 0.5, 3), "b": Variant(bits=2), "c": Variant()}
    masks, grids = apply_rtn_fit(m, choice, fisher)
    assert set(masks) == {"a", "b"} and grids["a"].bits == 3 and grids["b"].bits == 2
    assert torch.equal(masks["a"], fit_masks(fisher, model, {"a": 0.5})["a"])
    assert int((m.a.weight == 0).sum()) >= 12 and torch.all(m.a.weight[~masks["a"]] == 0)
    for n in ("a", "b"):
        w = getattr(m, n).weight.detach()
        torch.testing.assert_close(grids[n].quantize(w.float()).double(), w)  # on its grid
    assert torch.equal(m.c.weight, model.c.weight)
    # The Fisher-weighted distance counts each pruned weight's square plus the rounding errors.
    d = fit_perturbation(fisher, model, m)
    assert d >= float((fisher.diag["a"].double() * model.a.weight.detach() ** 2)[~masks["a"]].sum())
    before = _loss(m, X, Y)
    m.c.eval()
    hist = finetune(m, data, F.cross_entropy, masks, grids, epochs=3, lr=2e-3)
    assert len(hist) == 3 and _loss(m, X, Y) < before
    assert torch.all(m.a.weight[~masks["a"]] == 0)
    for n in ("a", "b"):
        w = getattr(m, n).weight.detach()
        torch.testing.assert_close(grids[n].quantize(w.float()).double(), w)
    assert all(p.grad is None for p in m.parameters()) and m.training and not m.c.training


# ---------------------------------------------------------------------------------------------
# bad input


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
    with pytest.raises(ValueError, match="cannot be reached.*least achievable"):
        plan_path(fisher, model, None, "size=1/64", bits=(8, 6), sparsity=(0.0, 0.5))
    with pytest.raises(ValueError, match="strictly decreasing"):
        plan_path(fisher, model, None, "size=0.3", bits=(4, 8))
    with pytest.raises(ValueError, match="strictly increasing"):
        plan_path(fisher, model, None, "size=0.3", sparsity=(0.5, 0.2))
    with pytest.raises(ValueError, match="2..8"):
        plan_path(fisher, model, None, "size=0.3", bits=(8, 1))
    with pytest.raises(ValueError, match="mode"):
        plan_path(fisher, model, None, "size=0.3", mode="dfs")
    with pytest.raises(ValueError, match="lam"):
        plan_path(fisher, model, None, "size=0.3", lam=-1)
    with pytest.raises(ValueError, match="expanded 2 states"):
        plan_path(fisher, model, None, "bops=1/40", bits=BITS, sparsity=LEVELS, lam=0.0, max_expansions=2)
    with pytest.raises(ValueError, match="Fisher"):
        plan_path("fisher", model, None, "size=0.3")
    with pytest.raises(ValueError, match="shape"):
        fit_noise(fisher, {"a": Variant(bits=4)}, {"a": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="no Fisher"):
        fit_noise(fisher, {"zz": Variant(bits=4)}, {"zz": torch.zeros(4, 6)})
    with pytest.raises(ValueError, match="unstructured"):
        fit_noise(fisher, {"a": Variant("2:4", bits=4)}, model)
    with pytest.raises(ValueError, match="sparsity"):
        fit_masks(fisher, model, 1.0)
    with pytest.raises(ValueError, match="nothing to compress"):
        fit_recipe({"a": Variant()})
    with pytest.raises(ValueError, match="epochs"):
        finetune(model, data, F.cross_entropy, {}, {}, epochs=-1)
