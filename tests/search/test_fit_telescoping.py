import itertools
import math

import pytest

from obcompress.search.fit_apply import fit_recipe
from obcompress.search.fit_path import DEFAULT_SPARSITY
from obcompress.search.fit_score import fit_masks, fit_noise
from obcompress.search.fit_telescoping import TELESCOPING_SPARSITY, plan_telescoping_path
from obcompress.search.nonuniform import Configuration, parse_goal
from obcompress.search.space import Variant

NAMES = ("a", "b", "c")


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
        choice = {n: Variant.pruning(counts[n], sizes[n], BITS[i]) for n, i in zip(NAMES, b)}
        configs.append((b, s, choice))
    return configs


def _evaluate(fisher, model, goal, configs, zero_bin=True):
    dense = sum(goal.cost.dense(fisher.geometries[n]) for n in NAMES)
    out = {}
    for b, s, choice in configs:
        cost = sum(goal.cost(fisher.geometries[n], choice[n]) for n in NAMES)
        out[(b, s)] = (fit_noise(fisher, choice, model, delta="channel", zero_bin=zero_bin), cost, choice)
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
    p = plan_telescoping_path(fisher, model, None, goal, lam=0.0, mode="astar", **kw)
    assert p.fit == pytest.approx(best, rel=1e-9)
    assert p.cost <= goal.fraction * dense and p.g == pytest.approx(p.fit - p.path[0].fit, rel=1e-9)
    assert fit_noise(fisher, p.choice, model, delta="channel", zero_bin=True) == pytest.approx(p.fit, rel=1e-9)
    # The reference heuristic is not a lower bound: still a feasible answer, no better than the optimum.
    q = plan_telescoping_path(fisher, model, None, goal, lam=1.0, mode="astar", **kw)
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
    p = plan_telescoping_path(fisher, model, None, goal, bits=BITS, sparsity=LEVELS, lam=0.0, zero_bin=False,
                              mode="astar")
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
    p = plan_telescoping_path(fisher, model, None, goal, bits=BITS, sparsity=LEVELS, lam=lam, mode="beam", beam_width=1)
    assert [({n: s.bits[n] for n in NAMES}, s.sparsity) for s in p.path] == [
        ({n: BITS[i] for n, i in zip(NAMES, b)}, LEVELS[s]) for b, s in walk]
    assert p.g == pytest.approx(g) and p.expansions == len(walk) - 1
    assert p.choice == table[key][2]
    # A beam wider than any depth's states is breadth-first: the least FIT among the goal states of
    # the least depth (moves taken) that has one.
    depth = {k: sum(k[0]) + k[1] for k in table}
    first = min(depth[k] for k, v in table.items() if v[1] <= budget)
    wide = plan_telescoping_path(fisher, model, None, goal, bits=BITS, sparsity=LEVELS, lam=lam, mode="beam", beam_width=81)
    assert len(wide.path) == first + 1
    assert wide.fit == pytest.approx(min(v[0] for k, v in table.items() if v[1] <= budget and depth[k] == first))


def test_path_report_refresh_and_recipe(trained):
    model, _, _, _, fisher = trained
    goal = parse_goal("size=0.3")
    calls = []

    def refresh(step):
        calls.append(step)
        return fisher

    p = plan_telescoping_path(fisher, model, None, goal, bits=BITS, sparsity=LEVELS, lam=0.0, mode="astar")
    r = plan_telescoping_path(fisher, model, None, goal, bits=BITS, sparsity=LEVELS, lam=0.0, mode="astar",
                              refresh=refresh)
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
    easy = plan_telescoping_path(fisher, model, None, "bops=1/2", bits=BITS, sparsity=LEVELS)
    assert easy.expansions == 0 and len(easy.path) == 1
    # Its default schedule: 40 levels from 0 to 0.99 (FITCompress's goes to 0.999).
    assert len(TELESCOPING_SPARSITY) == 40 and TELESCOPING_SPARSITY[0] == 0
    assert TELESCOPING_SPARSITY[-1] == pytest.approx(0.99) and DEFAULT_SPARSITY[-1] == pytest.approx(0.999)
    assert p.planner == "telescoping" and p.weights is None


def test_bad_input(trained):
    model, X, Y, data, fisher = trained
    with pytest.raises(ValueError, match="cannot be reached.*least achievable"):
        plan_telescoping_path(fisher, model, None, "size=1/64", bits=(8, 6), sparsity=(0.0, 0.5))
    with pytest.raises(ValueError, match="strictly decreasing"):
        plan_telescoping_path(fisher, model, None, "size=0.3", bits=(4, 8))
    with pytest.raises(ValueError, match="strictly increasing"):
        plan_telescoping_path(fisher, model, None, "size=0.3", sparsity=(0.5, 0.2))
    with pytest.raises(ValueError, match="2..8"):
        plan_telescoping_path(fisher, model, None, "size=0.3", bits=(8, 1))
    with pytest.raises(ValueError, match="mode"):
        plan_telescoping_path(fisher, model, None, "size=0.3", mode="dfs")
    with pytest.raises(ValueError, match="lam"):
        plan_telescoping_path(fisher, model, None, "size=0.3", lam=-1)
    with pytest.raises(ValueError, match="expanded 2 states"):
        plan_telescoping_path(fisher, model, None, "bops=1/40", bits=BITS, sparsity=LEVELS, lam=0.0, mode="astar",
                              max_expansions=2)
    with pytest.raises(ValueError, match="Fisher"):
        plan_telescoping_path("fisher", model, None, "size=0.3")
    with pytest.raises(ValueError, match="nothing to compress"):
        fit_recipe({"a": Variant()})
