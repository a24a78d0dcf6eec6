"""FITCompress path planning as its authors define it (Zandonati et al., "Towards Optimal
Compression: Joint Pruning and Quantization", 2023; their public code, g12bftd/FITCompress).

A node of the search is a compressed copy theta of the searched layers' weights: one bit width per
layer (an index into the bit schedule) and one global sparsity level (an index into the sparsity
schedule), with the weights those were reached by. The start node is the dense weights at the
schedules' first entries. Expanding a node n (weights theta_n, Fisher F_n):

1. Approximate mode (``refresh``, the reference's default): the empirical Fisher is estimated again
   on the model holding theta_n; n's children inherit it. Without ``refresh`` one Fisher serves
   every node.
2. Importance ``I = F_n * theta_n^2`` per weight, over all searched layers at once. Each layer's
   single most important weight is never pruned, so that no layer is removed whole (the reference
   has no such guard; a variant cannot be 100 % sparse).
3. Children: one per layer that has a lower width left (that layer one step down the bit schedule)
   and one for the next sparsity level. A child's weights are every layer of theta_n quantized at
   the child's width for it, then the ``floor(level * N)`` weights of least ``I`` set to zero (the
   mask is re-ranked at every node, on that node's quantized weights). Quantization is the
   reference's fake quantizer: per tensor, symmetric, ``step = max|w| / (2^(b-1) - 1)``,
   ``w -> round(w / step) * step`` (``fake_quantize``).
4. A child's path cost is the parent's plus the Fisher-metric length of the step,
   ``g = g_n + sqrt(sum_i F_n,ii (theta_n,i - theta'_i)^2)``, and its heuristic the reference's
   ``renorm_heuristic``, ``h = |alpha' - goal| * sqrt(sum_i F_n,ii theta'_i^2)``, with ``alpha'`` the
   child's cost as a fraction of dense; the priority is ``f = g + lam * h`` (lam = 1 there).

A node's cost counts every zero weight as pruned, the ones rounding made as well as the masked ones
(the reference's ``compute_fake_active_bytes`` counts non-zeros): its configuration is, per layer,
``Variant.pruning(zeros_l, n_l, bits_l)`` under the goal's cost model. It meets the goal when that
cost is at most ``fraction * dense``.

Search (``mode``): ``"beam"`` with ``beam_width=1`` is the reference's greedy walk, the default.
Before each expansion the open list (the children of the last expansion, in the order generated:
layers in order, then the sparsity step) is scanned and the first node meeting the goal is
returned; otherwise the ``beam_width`` nodes of least f are expanded (width 1: the one). ``"astar"``
is a true A* over the search tree (the reference's open list, which it scans for any node meeting
the goal, made a heap): the node of least f is popped, returned if it meets the goal, else
expanded. Nodes are paths, not states: the weights reached depend on the way (masks are re-ranked
and grids re-fitted at every node), so two paths to the same widths and level are two nodes. With
``lam = 0`` it is uniform-cost search and returns the goal node of least path cost g (g never
decreases along a path); h is no lower bound, so with ``lam > 0`` no optimality is claimed. A*
keeps the weights, masks (and, with ``refresh``, the Fisher) of every expanded node, about 6-10
bytes per weight per expansion: for small models.

Schedules: the reference's sparsity schedule ``1 - logspace(0, -3, 40)`` (0 to 99.9 %), and bit
widths 8, 6, 4, 3, 2. The reference's CIFAR-10 script walks widths (3, 2) from a 3-bit start; the
8-bit start gives each layer the whole range its OBC database has. Its Fisher is estimated from 100
batches, and again from 20 at each expanded node (``run_fitcompress`` uses those counts, one pass at
most over a shorter calibration set); its search stops after 1,000 iterations (``max_expansions``).
"""

from __future__ import annotations

import heapq
import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .._progress import progress_bar
from .costs import CostModel
from .fisher import Fisher, check_fisher
from .fit_score import layer_weights
from .nonuniform import Configuration, Goal, parse_goal
from .space import LayerGeometry, Variant, configuration_recipe

__all__ = ["DEFAULT_BITS", "DEFAULT_SPARSITY", "FitPath", "PathStep", "fake_quantize", "plan_path"]

DEFAULT_BITS: Tuple[int, ...] = (8, 6, 4, 3, 2)
DEFAULT_SPARSITY: Tuple[float, ...] = tuple(float(s) for s in 1.0 - np.logspace(0, -3, 40))
FISHER_BATCHES = 100
REFRESH_BATCHES = 20
MAX_EXPANSIONS = 1000


def fake_quantize(w: torch.Tensor, bits: int) -> torch.Tensor:
    """The FITCompress reference's fake quantizer: one symmetric grid for the whole tensor with
    ``2^(b-1) - 1`` steps of ``max|w| / (2^(b-1) - 1)`` on either side of an exact zero."""
    half = 2 ** (bits - 1) - 1
    top = w.abs().max()
    if top == 0:
        return w.clone()
    step = top / half
    return torch.clamp(torch.round(w / step), -half, half) * step


# ---------------------------------------------------------------------------------------------
# results


@dataclass
class PathStep:
    """One node of a path: per-layer bits, the sparsity level (global, or per layer for the
    telescoping planner), the configuration it stands for, its FIT (the Fisher-weighted distance of
    its weights from the dense ones, or the noise model's FIT for the telescoping planner), its cost
    (fraction of dense), its path cost g and heuristic h."""

    bits: Dict[str, int]
    sparsity: Union[float, Dict[str, float]]
    choice: Dict[str, Variant]
    fit: float
    cost: float
    fraction: float
    g: float
    h: float = 0.0

    def to_dict(self) -> Dict[str, Any]:
        return {"bits": dict(self.bits), "sparsity": self.sparsity, "choice": {n: v.key for n, v in self.choice.items()},
                "fit": self.fit, "cost": self.cost, "fraction": self.fraction, "g": self.g, "h": self.h}


@dataclass
class FitPath:
    """The configuration a planner found and the path to it (``path[0]`` the start).

    ``weights``: the end node's weights per layer in each weight's shape (the FITCompress planner:
    what its configuration's masks and widths were measured on), None for the telescoping planner.
    """

    choice: Dict[str, Variant]
    path: List[PathStep]
    fit: float
    g: float
    cost: float
    dense_cost: float
    goal: Goal
    mode: str
    lam: float
    expansions: int
    seconds: float
    planner: str = "fitcompress"
    weights: Optional[Dict[str, torch.Tensor]] = None
    info: Dict[str, Any] = field(default_factory=dict)

    @property
    def reduction(self) -> float:
        return self.dense_cost / self.cost if self.cost > 0 else math.inf

    def recipe(self, *, activation_bits: Optional[int] = None) -> Dict[str, Any]:
        """The recipe ``compress`` applies to give every layer its variant with the OBC solvers."""
        return configuration_recipe(self.choice, activation_bits=activation_bits)

    def configuration(self) -> Configuration:
        return Configuration(choice=dict(self.choice), cost=self.cost, dense_cost=self.dense_cost, score=self.fit,
                             method=f"{self.planner}-{self.mode}", goal=self.goal,
                             info={"g": self.g, "lam": self.lam, "expansions": self.expansions, "seconds": self.seconds,
                                   **self.info})

    def to_dict(self) -> Dict[str, Any]:
        return {"planner": self.planner, "mode": self.mode, "lam": self.lam,
                "goal": {"cost": self.goal.cost.to_dict(), "fraction": self.goal.fraction},
                "fit": self.fit, "g": self.g, "cost": self.cost, "dense_cost": self.dense_cost,
                "reduction": self.reduction, "expansions": self.expansions, "seconds": self.seconds,
                "choice": {n: v.key for n, v in self.choice.items()}, "path": [s.to_dict() for s in self.path],
                "info": self.info}


# ---------------------------------------------------------------------------------------------
# arguments shared by the planners


def bits_schedule(bits: Any) -> Tuple[int, ...]:
    try:
        out = tuple(bits)
    except TypeError:
        raise ValueError(f"bits must be a sequence of bit widths, got {bits!r}") from None
    if not out:
        raise ValueError("the bit schedule is empty")
    for b in out:
        if isinstance(b, bool) or not isinstance(b, numbers.Integral) or not 2 <= b <= 8:
            raise ValueError(f"bit widths must be integers in 2..8, got {b!r} in {list(out)}")
    if any(a <= b for a, b in zip(out, out[1:])):
        raise ValueError(f"the bit schedule must be strictly decreasing (each move takes a layer one step down), "
                         f"got {list(out)}")
    return tuple(int(b) for b in out)


def sparsity_schedule(levels: Any) -> Tuple[float, ...]:
    try:
        out = tuple(float(s) for s in levels)
    except (TypeError, ValueError):
        raise ValueError(f"sparsity must be a sequence of levels in [0, 1), got {levels!r}") from None
    if not out:
        raise ValueError("the sparsity schedule is empty")
    for s in out:
        if not 0 <= s < 1 or math.isnan(s):
            raise ValueError(f"sparsity levels must be in [0, 1), got {s!r}")
    if any(a >= b for a, b in zip(out, out[1:])):
        raise ValueError(f"the sparsity schedule must be strictly increasing, got {[round(s, 4) for s in out]}")
    return out


def check_int(name: str, value: Any, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    return int(value)


def check_plan(fisher, model_or_weights, geoms, goal, bits, sparsity, lam, mode, beam_width, refresh,
               max_expansions) -> tuple:
    """A planner's arguments checked: (fisher, weights, geometries, goal, bits, levels, lam, mode,
    beam_width, max_expansions)."""
    fisher = check_fisher(fisher)
    goal, mode, beam_width, lam, max_expansions = check_search(goal, mode, beam_width, lam, max_expansions)
    bits = bits_schedule(bits)
    levels = sparsity_schedule(sparsity)
    if refresh is not None and not callable(refresh):
        raise ValueError(f"refresh must be callable or None, got {type(refresh).__name__}")
    geoms = check_geometries(fisher, geoms)
    W = layer_weights(fisher, model_or_weights, list(geoms))
    return fisher, W, geoms, goal, bits, levels, lam, mode, beam_width, max_expansions


def check_search(goal: Any, mode: Any, beam_width: Any, lam: Any, max_expansions: Any) -> Tuple[Goal, str, int, float, int]:
    goal = parse_goal(goal) if isinstance(goal, str) else goal
    if not isinstance(goal, Goal):
        raise ValueError(f"goal must be a Goal or a string like 'size=1/12', got {type(goal).__name__}")
    if mode not in ("astar", "beam"):
        raise ValueError(f"mode must be 'beam' (width 1: the reference's greedy walk) or 'astar', got {mode!r}")
    beam_width = check_int("beam_width", beam_width, 1)
    max_expansions = check_int("max_expansions", max_expansions, 1)
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not (0 <= lam < math.inf):
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
    return goal, mode, beam_width, float(lam), max_expansions


def check_geometries(fisher: Fisher, geoms: Optional[Mapping[str, LayerGeometry]]) -> Dict[str, LayerGeometry]:
    geoms = dict(fisher.geometries if geoms is None else geoms)
    if not geoms:
        raise ValueError("no layer to search: geoms is empty")
    for nm, g in geoms.items():
        if not isinstance(g, LayerGeometry):
            raise ValueError(f"geoms[{nm!r}] must be a LayerGeometry, got {type(g).__name__}")
        if nm not in fisher.diag:
            raise ValueError(f"layer {nm!r} has no Fisher (the Fisher holds {fisher.names[:5]}...)")
        if g.weights != fisher.diag[nm].numel():
            raise ValueError(f"layer {nm!r}: its geometry has {g.weights} weights, the Fisher {fisher.diag[nm].numel()}")
    return geoms


# ---------------------------------------------------------------------------------------------
# the FITCompress planner


@dataclass(eq=False)
class _Node:
    """A node: its state, scalars, and how it was made (parent and move: a layer index, -1 for the
    sparsity step); ``theta`` (flat, rows layout) once it is built, ``F`` once it is expanded."""

    bits: Tuple[int, ...]
    level: int
    g: float
    h: float
    cost: float
    zeros: Tuple[int, ...]
    parent: Optional["_Node"] = None
    move: Optional[int] = None
    theta: Optional[torch.Tensor] = None
    F: Optional[torch.Tensor] = None
    masks: Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]] = None
    distance: float = 0.0  # sum F_0 (theta_dense - theta)^2 under the first Fisher, once built

    @property
    def key(self) -> Tuple[Tuple[int, ...], int]:
        return self.bits, self.level


class _Planner:
    """The searched layers laid end to end (flat, each in its rows layout), and the moves."""

    def __init__(self, fisher: Fisher, W: Dict[str, torch.Tensor], names: List[str], geoms: Dict[str, LayerGeometry],
                 bits: Tuple[int, ...], levels: Tuple[float, ...], goal: Goal, lam: float,
                 refresh: Optional[Callable[[Dict[str, torch.Tensor]], Fisher]]):
        self.names, self.geoms, self.bits, self.levels, self.lam, self.refresh = names, geoms, bits, levels, lam, refresh
        self.shapes = [W[nm].shape for nm in names]
        self.sizes = [geoms[nm].weights for nm in names]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).tolist()
        self.N = self.offsets[-1]
        self.dense = self.flat({nm: W[nm] for nm in names}, torch.float32)
        self.F0 = self.flat(fisher.diag, torch.float32)
        self.cost_model: CostModel = goal.cost
        self.dense_cost = float(sum(goal.cost.dense(geoms[nm]) for nm in names))
        self.goal = goal
        self.budget = goal.fraction * self.dense_cost
        self._costs: Dict[Tuple[int, int, int], float] = {}

    def flat(self, tensors: Mapping[str, torch.Tensor], dtype) -> torch.Tensor:
        return torch.cat([self.geoms[nm].as_rows(tensors[nm].detach().cpu()).reshape(-1).to(dtype)
                          for nm in self.names])

    def unflat(self, theta: torch.Tensor) -> Dict[str, torch.Tensor]:
        out = {}
        for l, nm in enumerate(self.names):
            g = self.geoms[nm]
            part = theta[self.offsets[l]:self.offsets[l + 1]].reshape(g.groups * g.rows, g.cols)
            out[nm] = g.from_rows(part, self.shapes[l]).clone()
        return out

    def layer(self, t: torch.Tensor, l: int) -> torch.Tensor:
        return t[self.offsets[l]:self.offsets[l + 1]]

    def variant(self, l: int, zeros: int, b: int) -> Variant:
        # A layer wholly zero cannot be a variant; it keeps one weight's worth of cost.
        return Variant.pruning(min(zeros, self.sizes[l] - 1), self.sizes[l], self.bits[b])

    def layer_cost(self, l: int, zeros: int, b: int) -> float:
        k = (l, zeros, b)
        if k not in self._costs:
            self._costs[k] = float(self.cost_model(self.geoms[self.names[l]], self.variant(l, zeros, b)))
        return self._costs[k]

    def meets(self, node: _Node) -> bool:
        return node.cost <= self.budget * (1 + 1e-12)

    def h(self, cost: float, norm2: float) -> float:
        return abs(cost / self.dense_cost - self.goal.fraction) * math.sqrt(max(norm2, 0.0))

    def start(self) -> _Node:
        zeros = tuple(int((self.layer(self.dense, l) == 0).sum()) for l in range(len(self.names)))
        bits = (0,) * len(self.names)
        cost = sum(self.layer_cost(l, z, 0) for l, z in enumerate(zeros))
        norm2 = float((self.F0 * self.dense ** 2).sum())
        return _Node(bits, 0, 0.0, self.h(cost, norm2), cost, zeros, theta=self.dense)

    def fisher_at(self, node: _Node) -> torch.Tensor:
        if self.refresh is None:
            return self.F0
        f = check_fisher(self.refresh(self.unflat(node.theta)))
        for nm, shape in zip(self.names, self.shapes):
            if nm not in f.diag or tuple(f.diag[nm].shape) != tuple(shape):
                raise ValueError(f"refresh returned a Fisher without layer {nm!r} of the weight's shape")
        return self.flat(f.diag, torch.float32)

    def least(self, imp: torch.Tensor, k: int) -> torch.Tensor:
        """The ``k`` entries of least ``imp`` (True), ties in flat order: a stable sort's first k,
        found by a k-th value and a count (a sort of every weight at every node is the slow part)."""
        out = torch.zeros(self.N, dtype=torch.bool)
        k = min(k, self.N - len(self.names))  # the protected weights stay
        if k <= 0:
            return out
        t = torch.kthvalue(imp, k).values
        out = imp < t
        need = k - int(out.sum())
        if need > 0:
            out[torch.nonzero(imp == t).flatten()[:need]] = True
        return out

    def prune_masks(self, node: _Node) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Which weights the node's level and the next one set to zero (True = pruned), by the
        node's importance F_n theta_n^2; each layer's most important weight is never among them."""
        imp = node.F * node.theta ** 2
        for l in range(len(self.names)):
            part = self.layer(imp, l)
            part[int(torch.argmax(part))] = math.inf
        nxt = node.level + 1
        return (self.least(imp, int(self.levels[node.level] * self.N)),
                self.least(imp, int(self.levels[nxt] * self.N)) if nxt < len(self.levels) else None)

    def expand(self, node: _Node) -> List[_Node]:
        """The node's children with their g, h and cost (weights not built)."""
        node.F = self.fisher_at(node)
        node.masks = self.prune_masks(node)
        cur, nxt = node.masks
        L = len(self.names)
        # Per layer: the re-quantized weights at the current width (R) and one step lower (Q),
        # under the current mask (and R under the next level's mask): their squared Fisher
        # distances from theta_n (A, B, A2), squared Fisher norms (C, D, C2) and zeros.
        A, B, C, D, A2, C2 = (np.zeros(L) for _ in range(6))
        zR, zQ, zR2 = [0] * L, [0] * L, [0] * L

        def sums(th, F, new):
            return (float((F * (th - new) ** 2).sum()), float((F * new ** 2).sum()),
                    int((new == 0).sum()))

        for l in range(L):
            th, F = self.layer(node.theta, l), self.layer(node.F, l)
            R = fake_quantize(th, self.bits[node.bits[l]])
            m = self.layer(cur, l)
            A[l], C[l], zR[l] = sums(th, F, R.masked_fill(m, 0.0))
            if node.bits[l] + 1 < len(self.bits):
                B[l], D[l], zQ[l] = sums(th, F, fake_quantize(th, self.bits[node.bits[l] + 1]).masked_fill(m, 0.0))
            if nxt is not None:
                A2[l], C2[l], zR2[l] = sums(th, F, R.masked_fill(self.layer(nxt, l), 0.0))
        base = [self.layer_cost(l, zR[l], node.bits[l]) for l in range(L)]
        children = []
        for l in range(L):
            if node.bits[l] + 1 >= len(self.bits):
                continue
            bits = node.bits[:l] + (node.bits[l] + 1,) + node.bits[l + 1:]
            zeros = tuple(zR[:l]) + (zQ[l],) + tuple(zR[l + 1:])
            cost = sum(base) - base[l] + self.layer_cost(l, zQ[l], bits[l])
            g = node.g + math.sqrt(max(A.sum() - A[l] + B[l], 0.0))
            children.append(_Node(bits, node.level, g, self.h(cost, C.sum() - C[l] + D[l]), cost, zeros, node, l))
        if nxt is not None:
            cost = sum(self.layer_cost(l, zR2[l], node.bits[l]) for l in range(L))
            g = node.g + math.sqrt(max(A2.sum(), 0.0))
            children.append(_Node(node.bits, node.level + 1, g, self.h(cost, C2.sum()), cost, tuple(zR2), node, -1))
        return children

    def build(self, node: _Node) -> None:
        """The node's weights, from its parent's weights and Fisher and its move."""
        if node.theta is not None:
            return
        p = node.parent
        pruned = p.masks[0 if node.move >= 0 else 1]
        parts = [fake_quantize(self.layer(p.theta, l), self.bits[node.bits[l]]) for l in range(len(self.names))]
        node.theta = torch.cat(parts).masked_fill(pruned, 0.0)
        node.distance = float((self.F0 * (self.dense - node.theta) ** 2).sum())

    @staticmethod
    def release(node: _Node) -> None:
        """Drop what only the node's children needed to be built."""
        node.theta = node.F = node.masks = None

    def f(self, node: _Node) -> float:
        return node.g + self.lam * node.h

    def step(self, node: _Node) -> PathStep:
        return PathStep(
            bits={nm: self.bits[b] for nm, b in zip(self.names, node.bits)}, sparsity=self.levels[node.level],
            choice={nm: self.variant(l, z, b) for l, (nm, z, b) in enumerate(zip(self.names, node.zeros, node.bits))},
            fit=node.distance, cost=node.cost, fraction=node.cost / self.dense_cost, g=node.g, h=node.h)


def plan_path(
    fisher: Fisher,
    model_or_weights: Any,
    geoms: Optional[Mapping[str, LayerGeometry]],
    goal: Union[Goal, str],
    *,
    bits: Sequence[int] = DEFAULT_BITS,
    sparsity: Sequence[float] = DEFAULT_SPARSITY,
    lam: float = 1.0,
    mode: str = "beam",
    beam_width: int = 1,
    refresh: Optional[Callable[[Dict[str, torch.Tensor]], Fisher]] = None,
    max_expansions: int = MAX_EXPANSIONS,
    progress: bool = False,
) -> FitPath:
    """FITCompress: search per-layer bits and a global FIT-importance mask for ``goal`` (a ``Goal``
    or "size=1/12", "bops=1/8"), as the module docstring defines it. Defaults: the reference's
    greedy walk (beam of one), lam = 1, its schedules.

    ``fisher``: the empirical Fisher at the dense weights (``empirical_fisher``); ``geoms``: the
    searched layers' geometries (None: the Fisher's, all its layers); ``refresh(weights) ->
    Fisher``: the Fisher of the model holding ``weights`` ({layer: tensor in the weight's shape}),
    called once at each expanded node (the reference's approximate mode), e.g. ``run_fitcompress``'s
    estimate from 20 batches. The path's ``fit`` values are each node's ``sum F (theta_dense -
    theta)^2`` under ``fisher``. ``progress``: a bar over the expanded nodes.
    """
    t0 = time.perf_counter()
    fisher, W, geoms, goal, bits, levels, lam, mode, beam_width, max_expansions = check_plan(
        fisher, model_or_weights, geoms, goal, bits, sparsity, lam, mode, beam_width, refresh, max_expansions)
    names = list(geoms)
    pl = _Planner(fisher, W, names, geoms, bits, levels, goal, lam, refresh)
    start = pl.start()
    expansions = 0
    bar = progress_bar(desc="fitcompress path", unit="node", progress=progress)

    def expanding(v: _Node) -> None:
        bar.update(1)
        bar.set_postfix_str(f"{pl.goal.cost.name} {v.cost / pl.dense_cost:.4g} of dense, g {v.g:.4g}")

    def too_many():
        return ValueError(f"the search expanded {max_expansions} nodes without reaching {goal}: raise max_expansions "
                          "or ease the goal")

    def unreachable(node: _Node):
        return ValueError(f"goal {goal} cannot be reached with these schedules: the most compressed node the search "
                          f"reached is {node.cost / pl.dense_cost:.4g} of dense ({pl.dense_cost / node.cost:.3g}x "
                          f"reduction), every layer at {bits[-1]} bits and sparsity {levels[-1]:.4g}")

    found: Optional[_Node] = None
    if mode == "beam":
        opened = [start]
        while True:
            goals = [v for v in opened if pl.meets(v)]
            if goals:
                found = goals[0]
                break
            ranked = sorted(range(len(opened)), key=lambda i: (pl.f(opened[i]), i))[:beam_width]
            beam = [opened[i] for i in ranked]
            for v in beam:
                pl.build(v)
            # Memory: one generation of weights, Fisher and masks at a time.
            for v in {id(v.parent): v.parent for v in beam if v.parent is not None}.values():
                pl.release(v)
            children: List[_Node] = []
            for v in beam:
                if expansions >= max_expansions:
                    raise too_many()
                expansions += 1
                expanding(v)
                children += pl.expand(v)
            if not children:
                raise unreachable(min(beam, key=lambda v: v.cost))
            opened = children
    else:
        counter = 0
        heap = [(pl.f(start), counter, start)]
        deepest = start
        while heap:
            _, _, v = heapq.heappop(heap)
            if v.cost < deepest.cost:
                deepest = v
            if pl.meets(v):
                found = v
                break
            if expansions >= max_expansions:
                raise too_many()
            expansions += 1
            expanding(v)
            pl.build(v)
            for c in pl.expand(v):
                counter += 1
                heapq.heappush(heap, (pl.f(c), counter, c))
        if found is None:
            raise unreachable(deepest)
    bar.close()
    pl.build(found)
    chain: List[_Node] = []
    v = found
    while v is not None:
        chain.append(v)
        v = v.parent
    chain.reverse()
    path = [pl.step(v) for v in chain]
    end = path[-1]
    return FitPath(choice=dict(end.choice), path=path, fit=end.fit, g=end.g, cost=end.cost,
                   dense_cost=pl.dense_cost, goal=goal, mode=mode, lam=lam, expansions=expansions,
                   seconds=time.perf_counter() - t0, planner="fitcompress", weights=pl.unflat(found.theta),
                   info={"bits": list(bits), "sparsity": [float(s) for s in levels],
                         "beam_width": beam_width if mode == "beam" else None, "refreshed": refresh is not None,
                         "budget": pl.budget, "level": levels[found.level]})
