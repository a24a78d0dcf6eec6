"""The telescoping FIT planner: a variant of FITCompress, kept because its A* is exact.

It walks the same lattice as FITCompress (``fit_path``), one layer one step down its bit schedule
or the sparsity one step up, but it never builds the compressed weights: a state is the
configuration ``Variant.pruning(k_l, n_l, bits_l)`` per layer, its masks are FIT-importance masks
ranked once on the dense weights with one Fisher (``fit_masks``: a global ranking over all searched
layers, each layer's count capped at the schedule's largest level, or one ranking per layer), and
it is scored by the noise model of ``fit_noise`` with one step per output channel and the zero
bin (``delta="channel", zero_bin=True``). The search minimises

    g = sum over the steps of |FIT(next) - FIT(current)|          (the path's FIT length)
    priority = g + lam * h,   h = FIT(state) * max(0, cost(state) - budget) / dense

With the zero bin FIT never decreases along a move (a kept weight never costs more than its pruned
square, a coarser grid never less), so g telescopes to ``FIT(state) - FIT(start)``: ``mode="astar"``
(a heap, a closed set, stopping when a state meeting the goal is popped) with ``lam = 0`` is
uniform-cost search and returns the configuration of least FIT among all that meet the goal, which
FITCompress's path cost (the Fisher-metric length of steps between actual weights) and heuristic
cannot promise. With ``zero_bin=False`` the telescoping is lost (the result is the least path
length, which bounds the end state's FIT from above); ``h`` is not a lower bound, so with
``lam > 0`` the result meets the goal but may be worse than the optimum, in exchange for far fewer
expansions. ``mode="beam"`` keeps the ``beam_width`` states of least priority at each depth. The
optional ``refresh(step)`` re-estimates the Fisher at each expanded state; the steps out of that
state are measured with it, and no exactness is claimed then.

Sparsity schedule ``1 - logspace(0, -2, 40)`` (0 to 99 %); bits 8, 6, 4, 3, 2.
"""

from __future__ import annotations

import heapq
import time
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..solvers import num_pruned
from .costs import CostModel
from .fisher import Fisher, check_fisher
from .fit_path import DEFAULT_BITS, FitPath, PathStep, check_plan
from .fit_score import global_counts, importance, noise_steps, rounding_noise
from .nonuniform import Goal
from .space import LayerGeometry, Variant

__all__ = ["TELESCOPING_SPARSITY", "plan_telescoping_path"]

TELESCOPING_SPARSITY: Tuple[float, ...] = tuple(float(s) for s in 1.0 - np.logspace(0, -2, 40))


class _LayerTable:
    """One layer's FIT at each (pruned count, bits) the search can reach. Weights are ranked once by
    importance and only the cumulative sums at the reachable counts are kept (a few floats per
    level and bit width instead of several copies of the layer)."""

    def __init__(self, F: torch.Tensor, W: torch.Tensor, zero_bin: bool, bits: Sequence[int], ks: Iterable[int]):
        imp = (F * W ** 2).flatten()
        self.n = imp.numel()
        order = torch.argsort(imp, stable=True)
        at = sorted(set(ks))
        self.pos = {k: i for i, k in enumerate(at)}
        idx = torch.tensor(at, dtype=torch.long)

        def cum(v):
            return torch.cat([v.new_zeros(1), torch.cumsum(v[order], 0)])

        self.pruned = cum(imp)[idx].tolist()
        self.kept: Dict[int, List[float]] = {}
        for b in bits:
            c = cum(rounding_noise(F, W, noise_steps(W, b, "channel"), zero_bin).flatten())
            self.kept[b] = (c[-1] - c[idx]).tolist()

    def term(self, k: int, bits: int) -> float:
        i = self.pos[k]
        return self.pruned[i] + self.kept[bits][i]


class _Space:
    """States, moves, FIT and cost of the search under one Fisher."""

    def __init__(self, fisher: Fisher, W: Dict[str, torch.Tensor], names: List[str], geoms, bits, levels,
                 per_layer: bool, cost: CostModel, zero_bin: bool, cost_cache: Dict):
        self.names, self.bits, self.levels, self.per_layer = names, bits, levels, per_layer
        self.geoms, self.cost_model, self.cost_cache = geoms, cost, cost_cache
        self.sizes = [geoms[nm].weights for nm in names]
        if per_layer:
            self.counts = None
            self.layer_counts = [[min(num_pruned(s, n), n - 1) for s in levels] for n in self.sizes]
            ks = self.layer_counts
        else:
            imps = [importance(fisher, nm, W[nm]) for nm in names]
            self.counts = global_counts(imps, levels, levels[-1])
            del imps
            ks = [[c[l] for c in self.counts] for l in range(len(names))]
        self.tables = []
        for l, nm in enumerate(names):
            g = geoms[nm]
            self.tables.append(_LayerTable(g.as_rows(fisher.diag[nm]).double(), g.as_rows(W[nm]).double(), zero_bin,
                                           bits, ks[l]))
        self._fit: Dict[Any, float] = {}

    def start(self):
        L = len(self.names)
        return ((0,) * L, (0,) * L if self.per_layer else 0)

    def last(self):
        L = len(self.names)
        nb, ns = len(self.bits) - 1, len(self.levels) - 1
        return ((nb,) * L, (ns,) * L if self.per_layer else ns)

    def k(self, key) -> List[int]:
        _, s = key
        if self.per_layer:
            return [c[i] for c, i in zip(self.layer_counts, s)]
        return self.counts[s]

    def fit(self, key) -> float:
        if key not in self._fit:
            b = key[0]
            self._fit[key] = float(sum(t.term(k, self.bits[i]) for t, k, i in zip(self.tables, self.k(key), b)))
        return self._fit[key]

    def variant(self, l: int, k: int, bits: int) -> Variant:
        return Variant.pruning(k, self.tables[l].n, bits)

    def cost(self, key) -> float:
        total = 0.0
        for l, (k, i) in enumerate(zip(self.k(key), key[0])):
            ck = (self.names[l], k, self.bits[i])
            if ck not in self.cost_cache:
                self.cost_cache[ck] = float(self.cost_model(self.geoms[self.names[l]], self.variant(l, k, self.bits[i])))
            total += self.cost_cache[ck]
        return total

    def successors(self, key):
        b, s = key
        nb, ns = len(self.bits), len(self.levels)
        for l in range(len(b)):
            if b[l] + 1 < nb:
                yield (b[:l] + (b[l] + 1,) + b[l + 1:], s)
        if self.per_layer:
            for l in range(len(s)):
                if s[l] + 1 < ns:
                    yield (b, s[:l] + (s[l] + 1,) + s[l + 1:])
        elif s + 1 < ns:
            yield (b, s + 1)

    def step(self, key, g: float, dense: float, fit: Optional[float] = None, cost: Optional[float] = None) -> PathStep:
        b, s = key
        ks = self.k(key)
        fit = self.fit(key) if fit is None else fit
        cost = self.cost(key) if cost is None else cost
        return PathStep(
            bits={nm: self.bits[i] for nm, i in zip(self.names, b)},
            sparsity={nm: self.levels[i] for nm, i in zip(self.names, s)} if self.per_layer else self.levels[s],
            choice={nm: self.variant(l, k, self.bits[i]) for l, (nm, k, i) in enumerate(zip(self.names, ks, b))},
            fit=fit, cost=cost, fraction=cost / dense, g=g)


def plan_telescoping_path(
    fisher: Fisher,
    model_or_weights: Any,
    geoms: Optional[Mapping[str, LayerGeometry]],
    goal: Union[Goal, str],
    *,
    bits: Sequence[int] = DEFAULT_BITS,
    sparsity: Sequence[float] = TELESCOPING_SPARSITY,
    per_layer_sparsity: bool = False,
    lam: float = 1.0,
    mode: str = "beam",
    beam_width: int = 1,
    refresh: Optional[Callable[[PathStep], Fisher]] = None,
    zero_bin: bool = True,
    max_expansions: int = 20_000,
) -> FitPath:
    """Search per-layer bits and FIT-importance sparsity for ``goal`` (a ``Goal`` or "size=1/12",
    "bops=1/8"; see the module docstring for the state space, g, h and exactness).

    ``geoms``: the searched layers' geometries (None: the Fisher's, all its layers). A* on many
    layers can expand a great many states: past ``max_expansions`` it stops with an error; beam
    mode expands at most ``beam_width`` states per step.
    """
    t0 = time.perf_counter()
    fisher, W, geoms, goal, bits, levels, lam, mode, beam_width, max_expansions = check_plan(
        fisher, model_or_weights, geoms, goal, bits, sparsity, lam, mode, beam_width, refresh, max_expansions)
    names = list(geoms)
    cost_cache: Dict = {}

    def make_space(f: Fisher) -> _Space:
        return _Space(f, W, names, geoms, bits, levels, per_layer_sparsity, goal.cost, zero_bin, cost_cache)

    space = make_space(fisher)
    dense = float(sum(goal.cost.dense(geoms[nm]) for nm in names))
    budget = goal.fraction * dense
    least = space.cost(space.last())
    if least > budget * (1 + 1e-12):
        raise ValueError(f"goal {goal} cannot be reached with these schedules: the least achievable {goal.cost.name} "
                         f"(every layer at {bits[-1]} bits, sparsity {levels[-1]:.4g}) is {least / dense:.4g} of dense "
                         f"({dense / least:.3g}x reduction)")

    def fresh(key) -> _Space:
        if refresh is None:
            return space
        f = check_fisher(refresh(step_of(key)))
        for nm in names:
            if nm not in f.diag or f.diag[nm].shape != fisher.diag[nm].shape:
                raise ValueError(f"refresh returned a Fisher without layer {nm!r} of the weight's shape")
        return make_space(f)

    def h(fit: float, cost: float) -> float:
        return fit * max(0.0, cost - budget) / dense

    def meets(cost: float) -> bool:
        return cost <= budget * (1 + 1e-12)

    start = space.start()
    # node -> (g, parent, fit, cost, the space that generated it): FIT and counts stay those of the
    # Fisher the node was generated under, so that a refreshed Fisher cannot rewrite a path taken.
    nodes: Dict[Any, Tuple[float, Any, float, float, _Space]] = {
        start: (0.0, None, space.fit(start), space.cost(start), space)}
    expansions = 0
    counter = 0

    def step_of(key) -> PathStep:
        g, _, fit, cost, sp = nodes[key]
        return sp.step(key, g, dense, fit, cost)

    def expand(key, sp: _Space):
        g0 = nodes[key][0]
        f0 = sp.fit(key)
        for nxt in sp.successors(key):
            f1 = sp.fit(nxt)
            yield nxt, g0 + abs(f1 - f0), f1, sp.cost(nxt)

    def budget_error():
        return ValueError(f"the search expanded {max_expansions} states without reaching {goal}: use mode='beam', "
                          "a larger lam, or a larger max_expansions")

    found = None
    if mode == "astar":
        heap = [(lam * h(nodes[start][2], nodes[start][3]), counter, start)]
        closed = set()
        while heap:
            _, _, key = heapq.heappop(heap)
            if key in closed:
                continue
            if meets(nodes[key][3]):
                found = key
                break
            closed.add(key)
            if expansions >= max_expansions:
                raise budget_error()
            expansions += 1
            sp = fresh(key)
            for nxt, g1, f1, c1 in expand(key, sp):
                if nxt in closed or (nxt in nodes and nodes[nxt][0] <= g1):
                    continue
                nodes[nxt] = (g1, key, f1, c1, sp)
                counter += 1
                heapq.heappush(heap, (g1 + lam * h(f1, c1), counter, nxt))
    else:
        beam = [start]
        while True:
            goals = [k for k in beam if meets(nodes[k][3])]
            if goals:
                found = min(goals, key=lambda k: (nodes[k][0], nodes[k][2]))
                break
            cand: Dict[Any, Tuple[float, float, Any, float, float, _Space]] = {}
            for key in beam:
                if expansions >= max_expansions:
                    raise budget_error()
                expansions += 1
                sp = fresh(key)
                for nxt, g1, f1, c1 in expand(key, sp):
                    if nxt not in cand or g1 < cand[nxt][1]:
                        cand[nxt] = (g1 + lam * h(f1, c1), g1, key, f1, c1, sp)
            if not cand:  # cannot happen: the last state meets the goal (checked above)
                raise ValueError(f"the search ran out of moves before reaching {goal}")
            ranked = sorted(cand, key=lambda k: (cand[k][0], cand[k][1]))[:beam_width]
            for nxt in ranked:
                _, g1, parent, f1, c1, sp = cand[nxt]
                nodes[nxt] = (g1, parent, f1, c1, sp)
            beam = ranked
    if found is None:  # A* exhausted the lattice: only if the last state were infeasible
        raise ValueError(f"no state of the schedules meets {goal}")

    path: List[PathStep] = []
    key = found
    while key is not None:
        path.append(step_of(key))
        key = nodes[key][1]
    path.reverse()
    end = path[-1]
    return FitPath(choice=dict(end.choice), path=path, fit=end.fit, g=end.g, cost=end.cost, dense_cost=dense,
                   goal=goal, mode=mode, lam=float(lam), expansions=expansions, seconds=time.perf_counter() - t0,
                   planner="telescoping",
                   info={"bits": list(bits), "sparsity": [float(s) for s in levels],
                         "per_layer_sparsity": per_layer_sparsity, "beam_width": beam_width if mode == "beam" else None,
                         "zero_bin": zero_bin, "refreshed": refresh is not None, "budget": budget})
