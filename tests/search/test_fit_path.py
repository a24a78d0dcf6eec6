"""FITCompress as defined, checked on a model small enough to follow by hand: two linear layers,
36 weights. The oracle below computes each node from the definitions in plain Python floats
(fake quantization, importance, global mask, path cost, heuristic, BOPs), not with the planner."""

import math

import pytest
import torch

from obcompress.search.costs import kept_weights, make_cost
from obcompress.search.fisher import Fisher
from obcompress.search.fit_apply import apply_path_rtn
from obcompress.search.fit_path import DEFAULT_SPARSITY, fake_quantize, plan_path
from obcompress.search.nonuniform import parse_goal
from obcompress.search.space import LayerGeometry, Variant

NAMES = ("a", "b")
SHAPES = {"a": (4, 6), "b": (3, 4)}
BITS = (8, 4, 2)
LEVELS = (0.0, 0.3, 0.6, 0.9)


def _tiny():
    gen = torch.Generator().manual_seed(3)
    W = {n: torch.randn(*SHAPES[n], generator=gen) for n in NAMES}
    base = {n: torch.rand(*SHAPES[n], generator=gen) + 0.05 for n in NAMES}
    geoms = {n: LayerGeometry(n, "linear", 1, *SHAPES[n]) for n in NAMES}
    fisher = Fisher(diag=dict(base), traces={n: float(base[n].sum()) for n in NAMES}, geometries=geoms, batches=1,
                    samples=1, mode="batch", tol=0.05, converged=False)
    return W, base, fisher


def _refreshed(base, weights):
    """The test's stand-in for a re-estimated Fisher: it depends on the weights it is taken at."""
    return {n: base[n] * (1 + weights[n].double() ** 2).float() for n in NAMES}


# --- the oracle: plain Python, from the definitions ---------------------------------------------


def _fq(vals, bits):
    half = 2 ** (bits - 1) - 1
    step = max(abs(v) for v in vals) / half
    return [max(-half, min(half, round(v / step))) * step for v in vals]


def _flat(tensors):
    return {n: [float(v) for v in tensors[n].flatten()] for n in NAMES}


def _children(node, F, goal_fraction):
    """Children of ``node`` = (theta per layer, bit index per layer, level, g), in the order the
    reference generates them, each with (theta', bits', level', g', h', cost')."""
    theta, b, level, g = node
    imp = {n: [F[n][i] * theta[n][i] ** 2 for i in range(len(theta[n]))] for n in NAMES}
    for n in NAMES:  # each layer's most important weight is never pruned
        imp[n][max(range(len(imp[n])), key=lambda i: (imp[n][i], -i))] = math.inf
    ranked = sorted(((imp[n][i], k, i) for k, n in enumerate(NAMES) for i in range(len(theta[n]))))
    N = sum(len(theta[n]) for n in NAMES)

    def child(bits_idx, lv):
        pruned = {(NAMES[k], i) for _, k, i in ranked[: int(LEVELS[lv] * N)]}
        new = {n: _fq(theta[n], BITS[bits_idx[j]]) for j, n in enumerate(NAMES)}
        new = {n: [0.0 if (n, i) in pruned else v for i, v in enumerate(new[n])] for n in NAMES}
        step = math.sqrt(sum(F[n][i] * (theta[n][i] - new[n][i]) ** 2 for n in NAMES for i in range(len(new[n]))))
        # BOPs of a linear layer on vectors: kept weights x weight bits x 8-bit activations.
        cost = sum(sum(v != 0 for v in new[n]) * BITS[bits_idx[j]] * 8 for j, n in enumerate(NAMES))
        alpha = cost / (N * 16 * 16)
        h = abs(alpha - goal_fraction) * math.sqrt(sum(F[n][i] * new[n][i] ** 2 for n in NAMES for i in range(len(new[n]))))
        return (new, bits_idx, lv, g + step), h, cost

    out = []
    for j in range(len(NAMES)):
        if b[j] + 1 < len(BITS):
            out.append(child(b[:j] + (b[j] + 1,) + b[j + 1:], level))
    if level + 1 < len(LEVELS):
        out.append(child(b, level + 1))
    return out


def _greedy_oracle(W, base, goal_fraction, steps):
    """The reference's greedy walk for ``steps`` expansions: per expansion the weights it was taken
    at, the Fisher it used, and the children; the node chosen (least g + h, first on ties), or the
    first child meeting the goal."""
    budget = goal_fraction * 36 * 256
    node = (_flat(W), (0, 0), 0, 0.0)
    trail = []
    for _ in range(steps):
        F = _flat(_refreshed(base, {n: torch.tensor(node[0][n]).reshape(SHAPES[n]) for n in NAMES}))
        kids = _children(node, F, goal_fraction)
        met = [k for k in kids if k[2] <= budget]
        chosen = met[0] if met else min(kids, key=lambda k: k[0][3] + k[1])
        trail.append({"theta": node[0], "kids": kids, "chosen": chosen, "done": bool(met)})
        node = chosen[0]
        if met:
            break
    return trail


def test_first_steps_follow_the_definitions():
    W, base, fisher = _tiny()
    fraction = 0.04
    seen = []

    def refresh(weights):
        seen.append({n: w.clone() for n, w in weights.items()})
        return Fisher(diag=_refreshed(base, weights), traces={}, geometries=fisher.geometries, batches=1, samples=1,
                      mode="batch", tol=0.05, converged=False)

    p = plan_path(fisher, W, None, f"bops={fraction}", bits=BITS, sparsity=LEVELS, refresh=refresh)
    trail = _greedy_oracle(W, base, fraction, len(p.path) - 1)
    # Five steps, two of them sparsity steps, the last one onto the goal.
    assert len(p.path) == 6 and trail[-1]["done"]
    assert [s.sparsity for s in p.path] == [0.0, 0.0, 0.0, 0.3, 0.6, 0.6]
    assert p.expansions == len(trail) == len(seen)
    for t, (step, at) in enumerate(zip(p.path[1:], seen)):
        want = trail[t]
        # The node was expanded at the weights the definitions give (quantized, masked) ...
        for n in NAMES:
            torch.testing.assert_close(at[n].double().flatten(), torch.tensor(want["theta"][n], dtype=torch.float64),
                                       rtol=1e-6, atol=1e-7)
        (theta, b, lv, g), h, cost = want["chosen"]
        # ... and moved to the child the definitions choose, with its g, h and cost.
        assert step.bits == {n: BITS[b[j]] for j, n in enumerate(NAMES)} and step.sparsity == LEVELS[lv]
        assert step.g == pytest.approx(g, rel=1e-6) and step.h == pytest.approx(h, rel=1e-5)
        assert step.cost == pytest.approx(cost)
        for n in NAMES:  # its configuration counts the child's zeros (masked and rounded to zero)
            zeros = sum(v == 0 for v in theta[n])
            assert step.choice[n] == Variant.pruning(zeros, len(theta[n]), BITS[b[NAMES.index(n)]])
    end = trail[-1]["chosen"][0][0]
    for n in NAMES:
        torch.testing.assert_close(p.weights[n].double().flatten(), torch.tensor(end[n], dtype=torch.float64),
                                   rtol=1e-6, atol=1e-7)
    # Before the last step no child met the goal; at the last, the first child meeting it was taken
    # (in the order generated: layers, then the sparsity step), whatever its f.
    assert not any(t["done"] for t in trail[:-1])
    assert p.cost <= fraction * p.dense_cost


def test_without_refresh_one_fisher_serves_every_node():
    W, base, fisher = _tiny()
    p = plan_path(fisher, W, None, "bops=0.04", bits=BITS, sparsity=LEVELS)
    F = _flat(base)
    node = (_flat(W), (0, 0), 0, 0.0)
    assert len(p.path) > 3
    for step in p.path[1:]:
        kids = _children(node, F, 0.04)
        met = [k for k in kids if k[2] <= 0.04 * 36 * 256]
        chosen = met[0] if met else min(kids, key=lambda k: k[0][3] + k[1])
        assert step.g == pytest.approx(chosen[0][3], rel=1e-6) and step.h == pytest.approx(chosen[1], rel=1e-5)
        node = chosen[0]
    # The path's FIT is the Fisher-weighted distance of each node's weights from the dense ones.
    d = sum(F[n][i] * (float(W[n].flatten()[i]) - node[0][n][i]) ** 2 for n in NAMES for i in range(len(F[n])))
    assert p.fit == pytest.approx(d, rel=1e-5)


def test_astar_without_heuristic_is_uniform_cost_over_paths():
    W, base, fisher = _tiny()
    fraction = 0.06
    budget = fraction * 36 * 256
    F = _flat(base)
    # Every path of the tree from the start, cut at its first node meeting the goal.
    best = math.inf
    frontier = [(_flat(W), (0, 0), 0, 0.0)]
    while frontier:
        node = frontier.pop()
        for kid, _, cost in _children(node, F, fraction):
            if cost <= budget:
                best = min(best, kid[3])
            else:
                frontier.append(kid)
    p = plan_path(fisher, W, None, f"bops={fraction}", bits=BITS, sparsity=LEVELS, mode="astar", lam=0.0)
    assert p.g == pytest.approx(best, rel=1e-6) and p.cost <= budget
    greedy = plan_path(fisher, W, None, f"bops={fraction}", bits=BITS, sparsity=LEVELS)
    assert p.g <= greedy.g * (1 + 1e-9)


def test_fake_quantize_is_the_reference_grid():
    w = torch.tensor([-1.0, -0.34, 0.0, 0.2, 0.49, 0.51, 0.75])
    # 3 bits: 3 steps of 1/3 either side of zero.
    torch.testing.assert_close(fake_quantize(w, 3), torch.tensor([-1.0, -1 / 3, 0.0, 1 / 3, 1 / 3, 2 / 3, 2 / 3]))
    # 2 bits: -max, 0, max.
    torch.testing.assert_close(fake_quantize(w, 2), torch.tensor([-1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0]))


def test_apply_path_rtn_keeps_the_end_nodes_zeros_and_cost():
    W, base, fisher = _tiny()
    model = torch.nn.Module()
    for n in NAMES:
        setattr(model, n, torch.nn.Linear(SHAPES[n][1], SHAPES[n][0], bias=False))
        getattr(model, n).weight.data.copy_(W[n])
    p = plan_path(fisher, model, None, "bops=0.06", bits=BITS, sparsity=LEVELS)
    masks, grids = apply_path_rtn(model, p)
    for n in NAMES:
        w = getattr(model, n).weight.detach()
        assert torch.equal(masks[n], p.weights[n] != 0)
        assert torch.all(w[~masks[n]] == 0)
        # Round to nearest on one symmetric per-tensor grid of the masked dense weights.
        torch.testing.assert_close(w, fake_quantize(W[n] * masks[n], p.choice[n].bits))
        assert grids[n].strategy == "tensor" and grids[n].bits == p.choice[n].bits
        # What was applied costs no more than the configuration: extra zeros are free.
        assert int((w == 0).sum()) >= n_pruned(p.choice[n], w.numel())
    with pytest.raises(ValueError, match="FITCompress planner"):
        apply_path_rtn(model, p.__class__(**{**p.__dict__, "weights": None}))


def n_pruned(v, n):
    return n - kept_weights(LayerGeometry("x", "linear", 1, 1, n), v)


def test_integer_counts_on_a_1000_x_1280_layer():
    """A layer's pruned count travels as an integer: variant, key, recipe and cost all give k,
    where a level rounded to 4 decimals would be up to 64 weights off on 1.28M weights."""
    import yaml

    from obcompress.search.space import configuration_recipe
    from obcompress.solvers import num_pruned

    n = 1000 * 1280
    geom = LayerGeometry("fc", "linear", 1, 1000, 1280)
    for k in (640_037, 1_151_936, 12_801, 1, n - 1):
        v = Variant.pruning(k, n, 4)
        assert Variant.from_key(v.key) == v and num_pruned(v.sparsity, n) == k
        assert kept_weights(geom, v) == n - k
        rec = yaml.safe_load(yaml.safe_dump(configuration_recipe({"fc": v})))
        assert num_pruned(rec["layers"]["fc"]["sparsity"]["sparsity"], n) == k
    assert num_pruned(round(640_037 / n, 4), n) != 640_037  # what the 4-decimal level did
    # The planner's configurations count the end node's zeros exactly.
    gen = torch.Generator().manual_seed(0)
    W = {"fc": torch.randn(1000, 1280, generator=gen) * torch.rand(1000, 1, generator=gen),
         "b": torch.randn(10, 1000, generator=gen)}
    geoms = {"fc": geom, "b": LayerGeometry("b", "linear", 1, 10, 1000)}
    F = {k: torch.rand(w.shape, generator=gen) for k, w in W.items()}
    fisher = Fisher(diag=F, traces={}, geometries=geoms, batches=1, samples=1, mode="batch", tol=0.05, converged=False)
    p = plan_path(fisher, W, None, "size=1/12", sparsity=DEFAULT_SPARSITY[:12])
    for nm, w in p.weights.items():
        assert num_pruned(p.choice[nm].sparsity, w.numel()) == int((w == 0).sum())
    assert p.cost == pytest.approx(sum(make_cost("size")(geoms[nm], p.choice[nm]) for nm in W))


def test_bad_input():
    W, base, fisher = _tiny()
    with pytest.raises(ValueError, match="cannot be reached"):
        plan_path(fisher, W, None, "bops=0.001", bits=(8, 6), sparsity=(0.0, 0.1))
    with pytest.raises(ValueError, match="strictly decreasing"):
        plan_path(fisher, W, None, "size=0.3", bits=(4, 8))
    with pytest.raises(ValueError, match="strictly increasing"):
        plan_path(fisher, W, None, "size=0.3", sparsity=(0.5, 0.2))
    with pytest.raises(ValueError, match="mode"):
        plan_path(fisher, W, None, "size=0.3", mode="dfs")
    with pytest.raises(ValueError, match="expanded 1 nodes"):
        plan_path(fisher, W, None, "bops=0.06", bits=BITS, sparsity=LEVELS, max_expansions=1)
    with pytest.raises(ValueError, match="refresh returned"):
        plan_path(fisher, W, None, "bops=0.06", bits=BITS, sparsity=LEVELS,
                  refresh=lambda w: Fisher(diag={"a": torch.ones(4, 6)}, traces={}, geometries={}, batches=1,
                                           samples=1, mode="batch", tol=0.05, converged=False))
    with pytest.raises(ValueError, match="Fisher"):
        plan_path("fisher", W, None, "size=0.3")
    # The default search is the reference's greedy walk, as on the command line.
    assert plan_path(fisher, W, None, "bops=0.06", bits=BITS, sparsity=LEVELS).mode == "beam"
    assert parse_goal("bops=0.06").fraction == 0.06
