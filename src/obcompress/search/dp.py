"""Choosing one variant per layer under a budget: a multiple-choice knapsack.

Layer ``l`` offers options ``o`` with a score ``s[l][o]`` (an error, lower is better) and a cost
``c[l][o]``. We pick exactly one option per layer to minimise ``sum s`` subject to
``fixed_cost + sum c <= budget``.

``solve_dp`` is the OBC paper's dynamic program over a bucketed budget: fast for many layers and
options, within a stated rounding bound of the optimum. ``solve_exact`` solves the same problem as
a 0/1 integer program with HiGHS (``scipy.optimize.milp``): no rounding, meant for small problems
and as a cross-check of the DP. ``sweep`` runs either over several budgets.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from ..checks import check_int

__all__ = ["Selection", "solve_dp", "solve_exact", "sweep"]


@dataclass
class Selection:
    """One option per layer, with what it scores and costs.

    ``choice[l]`` is the option index taken in layer ``l``; ``score`` and ``cost`` are the true sums
    of the chosen options (``cost`` includes ``fixed_cost``), never the bucketed ones; ``budget`` is
    the budget asked for. ``slack`` bounds the DP's rounding loss: the selection's score is no worse
    than the optimum at budget ``budget - slack`` (0 for the exact solver). ``gap`` is the exact
    solver's relative MIP gap when a time limit stopped it before proving optimality (0 otherwise).
    ``method`` is "dp" or "milp".
    """

    choice: List[int]
    score: float
    cost: float
    budget: float
    slack: float
    method: str
    gap: float = 0.0


_Problem = Tuple[List[np.ndarray], List[np.ndarray]]


def _as_float(value: Any, what: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number, got {value!r}") from None
    return out


def _check(scores: Any, costs: Any, budget: Any, fixed_cost: Any) -> Tuple[_Problem, float, float]:
    """Validate a problem; return per-layer float64 arrays, budget and fixed cost."""
    if isinstance(scores, (str, bytes)) or isinstance(costs, (str, bytes)):
        raise ValueError("scores and costs must be sequences of per-layer sequences of numbers")
    try:
        n_s, n_c = len(scores), len(costs)
    except TypeError:
        raise ValueError("scores and costs must be sequences of per-layer sequences of numbers") from None
    if n_s != n_c:
        raise ValueError(f"scores has {n_s} layers but costs has {n_c}")
    if n_s == 0:
        raise ValueError("there must be at least one layer to choose for")
    budget = _as_float(budget, "budget")
    fixed_cost = _as_float(fixed_cost, "fixed_cost")
    if not math.isfinite(budget) or budget < 0:
        raise ValueError(f"budget must be a finite number >= 0, got {budget}")
    if not math.isfinite(fixed_cost) or fixed_cost < 0:
        raise ValueError(f"fixed_cost must be a finite number >= 0, got {fixed_cost}")

    S: List[np.ndarray] = []
    C: List[np.ndarray] = []
    for l in range(n_s):
        arrs = []
        for name, seq in (("scores", scores[l]), ("costs", costs[l])):
            try:
                a = np.asarray(seq, dtype=np.float64)
            except (TypeError, ValueError):
                raise ValueError(f"{name}[{l}] (layer {l}) must be a sequence of numbers") from None
            if a.ndim != 1:
                raise ValueError(f"{name}[{l}] (layer {l}) must be one-dimensional, got shape {a.shape}")
            if a.size == 0:
                raise ValueError(f"layer {l} has no options")
            if not np.all(np.isfinite(a)):
                raise ValueError(f"{name}[{l}] (layer {l}) contains NaN or infinite values")
            if np.any(a < 0):
                raise ValueError(f"{name}[{l}] (layer {l}) contains negative values; they must be >= 0")
            arrs.append(a)
        s, c = arrs
        if s.size != c.size:
            raise ValueError(f"layer {l} has {s.size} scores but {c.size} costs")
        S.append(s)
        C.append(c)

    # Summed in float the way a caller would add up a selection, so "least achievable" is exact.
    least = math.fsum([fixed_cost] + [float(c.min()) for c in C])
    room = budget - fixed_cost
    for l, c in enumerate(C):
        if c.min() > room:
            raise ValueError(
                f"layer {l}: every option costs more than the budget alone "
                f"(cheapest {c.min():.6g} + fixed_cost {fixed_cost:.6g} > budget {budget:.6g}); "
                f"the least achievable total cost is {least:.6g}"
            )
    if least > budget:
        raise ValueError(
            f"budget {budget:.6g} is infeasible: the least achievable total cost (each layer's "
            f"cheapest option plus fixed_cost) is {least:.6g}"
        )
    return (S, C), budget, fixed_cost


def _totals(S: List[np.ndarray], C: List[np.ndarray], choice: Sequence[int], fixed_cost: float):
    score = math.fsum(float(S[l][o]) for l, o in enumerate(choice))
    cost = math.fsum([fixed_cost] + [float(C[l][o]) for l, o in enumerate(choice)])
    return score, cost


def solve_dp(scores, costs, budget, *, buckets: int = 10000, fixed_cost: float = 0.0) -> Selection:
    """Minimise the total score with one option per layer, total cost <= ``budget``, by DP.

    The budget left after ``fixed_cost`` is cut into ``buckets`` buckets of width
    ``delta = (budget - fixed_cost) / buckets``. Each layer's costs are measured from that layer's
    cheapest option and rounded UP to whole buckets, and the capacity is the room left after every
    layer's cheapest option, rounded DOWN. Hence:

    * every returned selection is feasible under the true budget (``cost <= budget``);
    * any selection whose true cost is ``<= budget - slack`` is representable, so the returned
      score is ``<=`` the exact optimum at budget ``budget - slack``, where
      ``slack = L' * delta`` and ``L'`` is the number of layers whose options do not all cost the
      same (at most the layer count ``L``, since rounding up loses less than one bucket per layer);
    * the all-cheapest selection is always representable, so any feasible budget gets an answer;
    * for fixed ``buckets`` and ``fixed_cost`` a larger budget never gives a worse score (bucketed
      costs only shrink and the capacity only grows as the budget rises);
    * with integer costs and a bucket width of 1 (``buckets == budget - fixed_cost``) nothing is
      rounded and the DP is exact.

    Ties in score go to the lower true cost, then to the lower option indices. Time is
    O(total options x buckets) in numpy; memory O(L x buckets) (an int16/int32 option index per
    layer and bucket for backtracking).

    ``scores`` and ``costs`` are sequences (one per layer) of equal-length sequences of floats >= 0;
    layers may differ in option count. Bad input or an infeasible budget raises ValueError (the
    message names the layer, or says the least achievable cost).
    """
    buckets = check_int(buckets, "buckets")
    (S, C), budget, fixed_cost = _check(scores, costs, budget, fixed_cost)
    L = len(S)

    delta = (budget - fixed_cost) / buckets
    mins = [float(c.min()) for c in C]
    room = (budget - fixed_cost) - math.fsum(mins)
    # Rounding toward infeasibility on both sides keeps the feasibility guarantee exact; float
    # error can then cost at most one bucket, which the slack bound already absorbs.
    if delta > 0:
        cap = min(buckets, max(0, int(math.floor(room / delta))))
    else:
        cap = 0

    weights: List[np.ndarray] = []
    for c, m in zip(C, mins):
        excess = c - m
        w = np.full(c.shape, cap + 1, dtype=np.int64)  # cap + 1 marks "can never fit"
        zero = excess == 0
        w[zero] = 0
        if delta > 0:
            fits = ~zero & (excess <= room)
            w[fits] = np.minimum(np.ceil(excess[fits] / delta), cap + 1).astype(np.int64)
        weights.append(w)

    n_max = max(s.size for s in S)
    idx_dtype = np.int16 if n_max <= np.iinfo(np.int16).max else np.int32
    back = np.zeros((L, cap + 1), dtype=idx_dtype)

    # best_s[b] / best_c[b]: the lexicographically least (score, true cost) over the layers so far
    # with exactly b buckets used; inf marks unreachable bucket totals.
    best_s = np.full(cap + 1, np.inf)
    best_c = np.full(cap + 1, np.inf)
    best_s[0] = 0.0
    best_c[0] = 0.0
    for l in range(L):
        s, c, w = S[l], C[l], weights[l]
        new_s = np.full(cap + 1, np.inf)
        new_c = np.full(cap + 1, np.inf)
        row = back[l]
        # Visiting options cheapest first with strict comparisons leaves exact ties on the
        # cheaper option, then on the lower index (stable sort).
        for o in np.argsort(c, kind="stable"):
            wo = int(w[o])
            if wo > cap:
                continue
            n = cap + 1 - wo
            cand_s = best_s[:n] + s[o]
            cand_c = best_c[:n] + c[o]
            cur_s = new_s[wo:]
            cur_c = new_c[wo:]
            better = (cand_s < cur_s) | ((cand_s == cur_s) & (cand_c < cur_c))
            np.copyto(cur_s, cand_s, where=better)
            np.copyto(cur_c, cand_c, where=better)
            row[wo:][better] = o
        best_s, best_c = new_s, new_c

    # Least score, then least true cost, then fewest buckets: lexsort sorts by the last key first.
    b = int(np.lexsort((np.arange(cap + 1), best_c, best_s))[0])
    if not math.isfinite(best_s[b]):  # pragma: no cover - the all-cheapest selection fits at bucket 0
        raise RuntimeError("the DP found no feasible selection; this is a bug")
    choice = [0] * L
    for l in range(L - 1, -1, -1):
        o = int(back[l, b])
        choice[l] = o
        b -= int(weights[l][o])

    score, cost = _totals(S, C, choice, fixed_cost)
    varied = sum(1 for c in C if c.max() > c.min())
    return Selection(choice, score, cost, budget, varied * delta, "dp")


def solve_exact(scores, costs, budget, *, fixed_cost: float = 0.0,
                time_limit: Optional[float] = None) -> Selection:
    """Minimise the total score with one option per layer, total cost <= ``budget``, exactly.

    A 0/1 integer program solved by HiGHS through ``scipy.optimize.milp``: binary ``x[l, o]``,
    ``sum_o x[l, o] = 1`` per layer, ``sum c x <= budget - fixed_cost``. No bucketing, so no
    rounding loss (``slack = 0``); exponential in the worst case, meant for small problems and to
    cross-check ``solve_dp``. Ties in score are broken toward lower total cost by a second solve.

    ``time_limit`` (seconds, for both solves together) stops HiGHS early; the best selection found
    is returned with its relative gap in ``.gap`` (0 when optimality was proven). Same input rules
    and errors as ``solve_dp``; RuntimeError if no feasible selection was found in time.
    """
    if time_limit is not None:
        time_limit = _as_float(time_limit, "time_limit")
        if not time_limit > 0:
            raise ValueError(f"time_limit must be > 0 seconds, got {time_limit}")
    (S, C), budget, fixed_cost = _check(scores, costs, budget, fixed_cost)
    try:
        from scipy.optimize import Bounds, LinearConstraint, milp
        from scipy.sparse import csr_array
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("solve_exact needs scipy (pip install scipy)") from None

    L = len(S)
    sizes = np.array([s.size for s in S])
    n = int(sizes.sum())
    s_all = np.concatenate(S)
    c_all = np.concatenate(C)
    layer_of = np.repeat(np.arange(L), sizes)
    one_each = LinearConstraint(csr_array((np.ones(n), (layer_of, np.arange(n))), shape=(L, n)), 1, 1)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    deadline = None if time_limit is None else time.monotonic() + time_limit

    def run(objective, extra):
        options = {"mip_rel_gap": 0.0}
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                return None, None
            options["time_limit"] = left
        res = milp(objective, integrality=np.ones(n), bounds=Bounds(0, 1),
                   constraints=[one_each] + extra, options=options)
        if res.x is None:
            return None, None
        # One pick per layer from the relaxed 0/1 values: the largest is the chosen option even
        # when HiGHS returns 0.9999999 rather than 1.
        choice = [int(np.argmax(res.x[a:a + k])) for a, k in zip(starts, sizes)]
        gap = 0.0 if res.status == 0 else float(getattr(res, "mip_gap", math.inf) or 0.0)
        return choice, gap

    # HiGHS enforces constraints only up to its feasibility tolerance, so a selection can overshoot
    # the budget by a hair; tighten the right-hand side by the overshoot and solve again.
    rhs = budget - fixed_cost
    choice = gap = None
    for _ in range(5):
        choice, gap = run(s_all, [LinearConstraint(c_all[None, :], -np.inf, rhs)])
        if choice is None:
            break
        _, cost = _totals(S, C, choice, fixed_cost)
        if cost <= budget:
            break
        rhs -= (cost - budget) + 1e-12 * max(1.0, abs(budget))
        choice = None
    if choice is None:
        raise RuntimeError(
            "the exact solver found no feasible selection"
            + (" within the time limit" if time_limit is not None else "")
        )
    score, cost = _totals(S, C, choice, fixed_cost)

    if gap == 0.0:
        # Among selections tied at the optimal score, take the cheapest; kept only if it really
        # ties (HiGHS tolerances could let a slightly worse score through) and really is cheaper.
        tol = 1e-12 * max(1.0, abs(score))
        alt, alt_gap = run(c_all, [LinearConstraint(c_all[None, :], -np.inf, rhs),
                                   LinearConstraint(s_all[None, :], -np.inf, score + tol)])
        if alt is not None:
            a_score, a_cost = _totals(S, C, alt, fixed_cost)
            if a_score <= score and a_cost < cost and a_cost <= budget:
                choice, score, cost = alt, a_score, a_cost
    return Selection(choice, score, cost, budget, 0.0, "milp", gap)


def sweep(scores, costs, budgets: Sequence[float], *, method: str = "dp", **kw) -> List[Selection]:
    """Solve at each of ``budgets`` (in the order given) with ``solve_dp`` (``method="dp"``) or
    ``solve_exact`` (``method="milp"``); extra keywords go to the solver. Each budget gets its own
    DP, so each result carries its own rounding bound; an infeasible budget raises ValueError."""
    solvers = {"dp": solve_dp, "milp": solve_exact, "exact": solve_exact}
    if method not in solvers:
        raise ValueError(f"method must be 'dp' or 'milp', got {method!r}")
    try:
        budgets = list(budgets)
    except TypeError:
        raise ValueError("budgets must be a sequence of numbers") from None
    return [solvers[method](scores, costs, b, **kw) for b in budgets]
