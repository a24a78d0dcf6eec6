import itertools
import math

import numpy as np
import pytest

from obcompress.search.dp import Selection, solve_dp, solve_exact, sweep


def brute(scores, costs, budget, fixed=0.0):
    """Least total score over all selections with total cost <= budget (inf if none)."""
    best = math.inf
    for choice in itertools.product(*[range(len(s)) for s in scores]):
        cost = fixed + sum(costs[l][o] for l, o in enumerate(choice))
        if cost <= budget:
            best = min(best, sum(scores[l][o] for l, o in enumerate(choice)))
    return best


def instance(rng, integer):
    L = int(rng.integers(3, 6))
    sizes = rng.integers(2, 6, size=L)
    scores = [rng.random(k).round(3) for k in sizes]
    if integer:
        costs = [rng.integers(0, 11, size=k).astype(float) for k in sizes]
    else:
        costs = [rng.random(k) * 10 for k in sizes]
    lo = math.fsum(float(c.min()) for c in costs)
    hi = sum(c.max() for c in costs)
    return scores, costs, lo, hi


def check_selection(sel, scores, costs, budget, fixed=0.0):
    assert len(sel.choice) == len(scores)
    assert all(0 <= o < len(s) for o, s in zip(sel.choice, scores))
    assert sel.score == pytest.approx(sum(scores[l][o] for l, o in enumerate(sel.choice)), abs=1e-12)
    assert sel.cost == pytest.approx(fixed + sum(costs[l][o] for l, o in enumerate(sel.choice)), abs=1e-9)
    assert sel.cost <= budget + 1e-9


@pytest.mark.parametrize("integer", [True, False])
def test_dp_within_its_rounding_bound_of_brute_force(integer):
    rng = np.random.default_rng(1 if integer else 2)
    for _ in range(60):
        scores, costs, lo, hi = instance(rng, integer)
        fixed = float(rng.choice([0.0, 3.5]))
        budget = fixed + lo + rng.random() * (hi - lo) * 1.1
        buckets = int(rng.choice([1, 7, 50, 1000]))
        sel = solve_dp(scores, costs, budget, buckets=buckets, fixed_cost=fixed)
        check_selection(sel, scores, costs, budget, fixed)
        assert sel.method == "dp" and sel.budget == budget
        varied = sum(c.max() > c.min() for c in costs)
        assert sel.slack == pytest.approx(varied * (budget - fixed) / buckets)
        # The tightened budget removes a hair more than slack so float ties at the edge cannot
        # make the reference optimum look better than what the DP could represent.
        assert sel.score <= brute(scores, costs, budget - sel.slack - 1e-9, fixed) + 1e-12
        assert sel.score >= brute(scores, costs, budget, fixed) - 1e-12


def test_dp_exact_with_unit_buckets_on_integer_costs():
    rng = np.random.default_rng(3)
    for _ in range(80):
        scores, costs, lo, hi = instance(rng, integer=True)
        fixed = float(rng.integers(0, 4))
        budget = fixed + float(rng.integers(lo, hi + 2))
        if budget - fixed < 1:
            continue
        sel = solve_dp(scores, costs, budget, buckets=int(budget - fixed), fixed_cost=fixed)
        check_selection(sel, scores, costs, budget, fixed)
        assert sel.score == pytest.approx(brute(scores, costs, budget, fixed), abs=1e-12)


def test_exact_equals_brute_force():
    rng = np.random.default_rng(4)
    for k in range(25):
        scores, costs, lo, hi = instance(rng, integer=k % 2 == 0)
        budget = lo + rng.random() * (hi - lo)
        sel = solve_exact(scores, costs, budget)
        check_selection(sel, scores, costs, budget)
        assert sel.method == "milp" and sel.slack == 0.0 and sel.gap == 0.0
        assert sel.score == pytest.approx(brute(scores, costs, budget), abs=1e-9)


def test_exact_and_dp_agree_on_a_larger_problem():
    rng = np.random.default_rng(5)
    S = rng.random((12, 20))
    C = rng.integers(1, 30, size=(12, 20)).astype(float)
    budget = float(C.min(1).sum() + 60)
    dp = solve_dp(S, C, budget, buckets=int(budget))
    ex = solve_exact(S, C, budget)
    assert dp.score == pytest.approx(ex.score, abs=1e-9)
    assert dp.cost <= budget and ex.cost <= budget


@pytest.mark.parametrize("solver", [solve_dp, solve_exact])
def test_more_budget_never_scores_worse(solver):
    rng = np.random.default_rng(6)
    for _ in range(4 if solver is solve_exact else 15):
        scores, costs, lo, hi = instance(rng, integer=False)
        lo = math.fsum(float(c.min()) for c in costs)  # exactly the least achievable cost
        budgets = np.linspace(lo, hi * 1.05, 12)
        kw = {"buckets": 40} if solver is solve_dp else {}
        got = [solver(scores, costs, b, **kw).score for b in budgets]
        assert all(b <= a + 1e-12 for a, b in zip(got, got[1:]))


def test_ties_go_to_the_lower_cost_deterministically():
    scores = [[1.0, 1.0, 1.0, 2.0], [0.5, 0.5]]
    costs = [[5.0, 2.0, 2.0, 0.0], [3.0, 1.0]]
    for solver in (solve_dp, solve_exact):
        picks = {tuple(solver(scores, costs, 20.0).choice) for _ in range(3)}
        assert len(picks) == 1
        choice = picks.pop()
        assert choice[1] == 1
        assert costs[0][choice[0]] == 2.0
    assert solve_dp(scores, costs, 20.0).choice == [1, 1]


def test_tight_budget_gives_the_cheapest_selection():
    scores = [[0.0, 1.0], [0.0, 2.0, 3.0], [0.0, 5.0]]
    costs = [[0.3, 0.1], [0.7, 0.2, 0.4], [0.9, 0.25]]
    least = 0.1 + 0.2 + 0.25 + 1.0
    for sel in (solve_dp(scores, costs, least, fixed_cost=1.0, buckets=3),
                solve_exact(scores, costs, least, fixed_cost=1.0)):
        assert sel.choice == [1, 1, 1]
        assert sel.cost <= least


def test_zero_budget_with_free_options():
    sel = solve_dp([[1.0, 0.5, 0.2]], [[0.0, 0.0, 1.0]], 0.0)
    assert sel.choice == [1] and sel.cost == 0.0 and sel.slack == 0.0


def test_layers_may_differ_in_option_count_and_sweep_runs_each_budget():
    scores = [[3.0, 1.0], [4.0, 2.0, 0.0], [1.0]]
    costs = [[0.0, 1.0], [0.0, 1.0, 2.0], [0.5]]
    budgets = [0.5, 1.5, 2.5, 3.5]
    exact = sweep(scores, costs, budgets, method="milp")
    assert [s.score for s in exact] == [8.0, 6.0, 4.0, 2.0]
    out = sweep(scores, costs, budgets, buckets=100)
    assert all(isinstance(s, Selection) and s.method == "dp" for s in out)
    for b, sel in zip(budgets, out):
        assert [sel.budget, sel.choice[2]] == [b, 0]
        assert brute(scores, costs, b) <= sel.score <= brute(scores, costs, b - sel.slack)
    assert sweep(scores, costs, []) == []


def test_infeasible_budgets_say_the_least_achievable_cost():
    scores = [[1.0, 0.0], [1.0, 0.0]]
    costs = [[2.0, 3.0], [1.0, 4.0]]
    for solver in (solve_dp, solve_exact):
        with pytest.raises(ValueError, match=r"least achievable total cost .* 4\b"):
            solver(scores, costs, 3.5, fixed_cost=1.0)
        with pytest.raises(ValueError, match=r"layer 0: every option costs more"):
            solver(scores, costs, 1.5)


@pytest.mark.parametrize(
    "scores, costs, kw, pattern",
    [
        ([[1.0]], [[1.0]], {"budget": -1.0}, "budget must be a finite number >= 0"),
        ([[1.0]], [[1.0]], {"budget": math.inf}, "budget must be a finite"),
        ([[1.0]], [[1.0]], {"budget": 2.0, "fixed_cost": -1.0}, "fixed_cost"),
        ([[1.0], [math.nan]], [[1.0], [1.0]], {"budget": 5.0}, r"scores\[1\] \(layer 1\) contains NaN"),
        ([[1.0], [1.0]], [[1.0], [math.inf]], {"budget": 5.0}, r"costs\[1\] \(layer 1\) contains NaN or inf"),
        ([[1.0], [1.0, 2.0]], [[1.0], [1.0, -2.0]], {"budget": 5.0}, r"costs\[1\] \(layer 1\) contains negative"),
        ([[1.0], []], [[1.0], []], {"budget": 5.0}, "layer 1 has no options"),
        ([[1.0], [1.0, 2.0]], [[1.0], [1.0]], {"budget": 5.0}, "layer 1 has 2 scores but 1 costs"),
        ([[1.0], [1.0]], [[1.0]], {"budget": 5.0}, "scores has 2 layers but costs has 1"),
        ([], [], {"budget": 5.0}, "at least one layer"),
        ([["a"]], [[1.0]], {"budget": 5.0}, r"scores\[0\] \(layer 0\) must be a sequence of numbers"),
    ],
)
@pytest.mark.parametrize("solver", [solve_dp, solve_exact])
def test_bad_input(solver, scores, costs, kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        solver(scores, costs, **kw)


@pytest.mark.parametrize("buckets", [0, -3, 2.5, True, "10"])
def test_bad_bucket_counts(buckets):
    with pytest.raises(ValueError, match="buckets must be an integer >= 1"):
        solve_dp([[1.0]], [[1.0]], 2.0, buckets=buckets)


def test_bad_sweep_and_time_limit():
    with pytest.raises(ValueError, match="method must be"):
        sweep([[1.0]], [[1.0]], [2.0], method="greedy")
    with pytest.raises(ValueError, match="time_limit"):
        solve_exact([[1.0]], [[1.0]], 2.0, time_limit=0)
