"""GPTQ and SparseGPT against a plain float64 fixed-order OBS reference, plus their structural promises."""

import math

import pytest
import torch

from obcompress.solvers._common import layer_loss, num_pruned, prepare_layer
import dataclasses

from obcompress.solvers.gptq import _inverse_upper_factor, _tril_inverse, gptq_quantize, sparsegpt_prune
from obcompress.solvers.grid import QuantGrid, minmax_params

F64 = torch.float64


def make_problem(rows=24, cols=40, n=400, seed=0, dead=()):
    """W and H = 2 X^T X / n with strongly correlated inputs (X = Z A, A with a decaying spectrum)."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(n, cols, generator=g, dtype=F64)
    A = torch.randn(cols, cols, generator=g, dtype=F64) * torch.logspace(0, -2, cols, dtype=F64)[:, None]
    X = Z @ A + 0.05 * torch.randn(n, cols, generator=g, dtype=F64)
    for d in dead:
        X[:, d] = 0
    H = 2 * X.t() @ X / n
    W = torch.randn(rows, cols, generator=g).float()
    return W, H


def q64(w, s, z, maxq):
    return s * torch.clamp(torch.round(w / s), -z, maxq - z)


def fixed_order_obs(W, H, order, target, damp=0.01):
    """Reference: fix columns one at a time in ``order``; after each, move the still-free columns by the
    OBS update with the current H^-1 and eliminate the fixed column from H^-1 (Gaussian elimination)."""
    prep = prepare_layer(W, H, damp)
    Wc = prep.W.clone()
    Hinv = prep.Hinv.clone()
    for step, j in enumerate(order):
        t = target(Wc, step, j)
        err = (Wc[:, j] - t) / Hinv[j, j]
        Wc -= err[:, None] * Hinv[j][None, :]
        Wc[:, j] = t
        Hinv -= torch.outer(Hinv[:, j], Hinv[j]) / Hinv[j, j]
    return Wc


def grid_target(grid, cols):
    s_all, z_all = (t.to(F64) for t in grid.expand(grid.scale.shape[0], cols))

    def target(Wc, step, j):
        return q64(Wc[:, j], s_all[:, j], z_all[:, j], grid.maxq)

    return target


def act_order_perm(W, H, damp=0.01):
    return torch.argsort(torch.diagonal(prepare_layer(W, H, damp).H), descending=True, stable=True).tolist()


def rtn_loss(W, H, grid):
    return layer_loss(W, grid.quantize(W), H)


# ------------------------------------------------------------------------------------------------
# GPTQ


def test_inverse_upper_factor_both_routes():
    W, H = make_problem(rows=4, cols=300, n=900, seed=16)
    rev = torch.arange(299, -1, -1)
    prep = prepare_layer(W[:, rev], H[rev][:, rev], 0.01)
    Hp_inv = torch.linalg.inv(H + 0.01 * torch.diagonal(H).mean() * torch.eye(300, dtype=F64))
    L = prep.L
    assert torch.allclose(_tril_inverse(L, base=16) @ L, torch.eye(300, dtype=F64), atol=1e-9)
    for p in (prep, dataclasses.replace(prep, Hinv=None)):
        U = _inverse_upper_factor(p)
        assert torch.equal(U, torch.triu(U)) and (torch.diagonal(U) > 0).all()
        assert torch.allclose(U.t() @ U, Hp_inv, rtol=1e-8, atol=1e-8 * float(Hp_inv.abs().max()))


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_equals_fixed_order_obs(act_order):
    W, H = make_problem(rows=12, cols=37, seed=1)
    grid = QuantGrid.fit(W, 3)
    res = gptq_quantize(W, H, grid, block_size=8, act_order=act_order, dtype=F64)
    order = act_order_perm(W, H) if act_order else list(range(W.shape[1]))
    ref = fixed_order_obs(W, H, order, grid_target(grid, W.shape[1]))
    assert torch.allclose(res.weight.to(F64), ref, atol=1e-6, rtol=0)
    assert res.method == "gptq" and res.info["act_order"] == act_order


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_dynamic_groups_equal_reference_refit(act_order):
    W, H = make_problem(rows=10, cols=30, seed=2)
    gs, bits = 8, 3
    grid = QuantGrid.fit(W, bits, symmetric=False)
    order = act_order_perm(W, H) if act_order else list(range(W.shape[1]))
    cur = {}

    def target(Wc, step, j):
        if step % gs == 0:  # fit the group from the current weights of its columns
            s, z = minmax_params(Wc[:, order[step:step + gs]], bits, symmetric=False)
            cur["s"], cur["z"] = s.to(F64), z.to(F64)
        return q64(Wc[:, j], cur["s"], cur["z"], 2**bits - 1)

    ref = fixed_order_obs(W, H, order, target)
    # block sizes that cut groups (5), contain several groups (16) or one (8)
    for bs in (5, 8, 16):
        res = gptq_quantize(W, H, grid, block_size=bs, act_order=act_order, group_size=gs, dtype=F64)
        assert torch.allclose(res.weight.to(F64), ref, atol=1e-6, rtol=0), bs


def test_gptq_loss_is_layer_loss_and_beats_rtn():
    for seed in range(4):
        W, H = make_problem(rows=32, cols=48, seed=10 + seed)
        grid = QuantGrid.fit(W, 4)
        for ao in (False, True):
            res = gptq_quantize(W, H, grid, act_order=ao)
            assert math.isclose(res.loss, layer_loss(W, res.weight, H), rel_tol=1e-5)
            assert res.loss <= rtn_loss(W, H, grid)
            assert res.weight.dtype == W.dtype and res.weight.shape == W.shape
            assert torch.equal(grid.quantize(res.weight), res.weight)
            assert res.grid is grid


@pytest.mark.parametrize("bs", [7, 128])
def test_gptq_block_size_invariance(bs):
    W, H = make_problem(rows=16, cols=45, seed=3)
    grid = QuantGrid.fit(W, 4)
    base = gptq_quantize(W, H, grid, block_size=1, dtype=F64)
    res = gptq_quantize(W, H, grid, block_size=bs, dtype=F64)
    assert torch.allclose(res.weight, base.weight, atol=1e-6, rtol=0)
    res32 = gptq_quantize(W, H, grid, block_size=bs)
    assert torch.allclose(res32.weight, base.weight, atol=1e-4, rtol=0)
    assert math.isclose(res32.loss, base.loss, rel_tol=1e-3)


@pytest.mark.parametrize("act_order,static", [(False, False), (True, False), (False, True), (True, True)])
def test_gptq_groups_grid_reproduces_weights(act_order, static):
    W, H = make_problem(rows=20, cols=50, seed=4)
    bits, gs = 3, 16
    grid = QuantGrid.fit(W, bits)
    res = gptq_quantize(W, H, grid, act_order=act_order, group_size=gs, static_groups=static, block_size=24)
    g = res.grid
    assert isinstance(g, QuantGrid) and g.strategy == "group" and g.group_size == gs and g.bits == bits
    assert g.scale.shape == (20, math.ceil(50 / gs))
    assert torch.equal(g.quantize(res.weight), res.weight)
    cg = g.column_groups(50)
    if act_order and not static:
        assert g.g_idx is not None
        # every group holds gs processed columns (the last one the remainder)
        assert sorted(torch.bincount(cg).tolist()) == sorted([gs, gs, gs, 50 - 3 * gs])
    for k in range(g.scale.shape[1]):
        vals = res.weight[:, cg == k]
        for r in range(vals.shape[0]):
            assert vals[r].unique().numel() <= 2**bits
    assert math.isclose(res.loss, layer_loss(W, res.weight, H), rel_tol=1e-5)


def test_gptq_reuses_an_act_order_group_grid():
    W, H = make_problem(rows=8, cols=30, seed=14)
    first = gptq_quantize(W, H, QuantGrid.fit(W, 4), act_order=True, group_size=8)
    assert first.grid.g_idx is not None
    again = gptq_quantize(W, H, first.grid, act_order=True)
    assert again.grid is first.grid
    assert torch.equal(first.grid.quantize(again.weight), again.weight)


def test_gptq_group_strategy_grid_implies_groups():
    W, H = make_problem(rows=8, cols=32, seed=5)
    grid = QuantGrid.fit(W, 4, strategy="group", group_size=8)
    res = gptq_quantize(W, H, grid)
    assert res.grid.strategy == "group" and res.grid.group_size == 8 and res.info["group_size"] == 8
    assert torch.equal(res.grid.quantize(res.weight), res.weight)
    assert res.loss <= rtn_loss(W, H, grid)


def test_gptq_dead_inputs():
    W, H = make_problem(rows=10, cols=20, seed=6, dead=(0, 7, 19))
    grid = QuantGrid.fit(W, 4)
    res = gptq_quantize(W, H, grid, act_order=True)
    assert torch.isfinite(res.weight).all()
    assert (res.weight[:, [0, 7, 19]] == 0).all()
    assert math.isclose(res.loss, layer_loss(W, res.weight, H), rel_tol=1e-5)
    assert res.loss <= rtn_loss(W, H, grid)


def test_gptq_errors():
    W, H = make_problem(rows=8, cols=16)
    grid = QuantGrid.fit(W, 4)
    with pytest.raises(ValueError, match="rows"):
        gptq_quantize(W, H, QuantGrid.fit(W[:4], 4))
    with pytest.raises(ValueError, match="block_size"):
        gptq_quantize(W, H, grid, block_size=0)
    with pytest.raises(ValueError, match="group_size"):
        gptq_quantize(W, H, grid, group_size=0)
    with pytest.raises(ValueError, match="QuantGrid"):
        gptq_quantize(W, H, "int4")
    with pytest.raises(ValueError, match="columns"):
        gptq_quantize(W, H[:8, :8], grid)
    with pytest.raises(ValueError, match="damp"):
        gptq_quantize(W, H, grid, damp=-1.0)
    with pytest.raises(ValueError, match="dtype"):
        gptq_quantize(W, H, grid, dtype=torch.float16)


# ------------------------------------------------------------------------------------------------
# SparseGPT


def magnitude_loss(W, H, sparsity=None, n=None, m=None):
    if n is None:
        k = num_pruned(sparsity, W.numel())
        idx = W.abs().flatten().argsort()[:k]
        Wm = W.flatten().clone()
        Wm[idx] = 0
        Wm = Wm.view_as(W)
    else:
        g = W.reshape(W.shape[0], -1, m)
        drop = g.abs().argsort(dim=2)[:, :, : m - n]
        Wm = g.scatter(2, drop, 0).reshape_as(W)
    return layer_loss(W, Wm, H)


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.77])
@pytest.mark.parametrize("bs", [7, 128])
def test_sparsegpt_exact_count(sparsity, bs):
    W, H = make_problem(rows=13, cols=41, seed=7)
    res = sparsegpt_prune(W, H, sparsity, block_size=bs)
    assert res.mask.dtype == torch.bool and res.mask.shape == W.shape
    assert int((~res.mask).sum()) == num_pruned(sparsity, W.numel())
    assert (res.weight[~res.mask] == 0).all()
    assert math.isclose(res.loss, layer_loss(W, res.weight, H), rel_tol=1e-5)
    assert res.method == "sparsegpt" and res.grid is None


def test_sparsegpt_equals_fixed_order_obs_on_its_mask():
    W, H = make_problem(rows=9, cols=30, seed=8)
    grid = QuantGrid.fit(W, 4)
    for g in (None, grid):
        res = sparsegpt_prune(W, H, 0.6, grid=g, block_size=7, dtype=F64)
        keep = res.mask.to(F64)
        quant = grid_target(grid, 30) if g is not None else (lambda Wc, step, j: Wc[:, j])

        def target(Wc, step, j):
            return quant(Wc, step, j) * keep[:, j]

        ref = fixed_order_obs(W, H, range(30), target)
        assert torch.allclose(res.weight.to(F64), ref, atol=1e-6, rtol=0)


def test_sparsegpt_nm():
    W, H = make_problem(rows=16, cols=48, seed=9)
    res = sparsegpt_prune(W, H, mask_structure="2:4")
    kept = res.mask.reshape(16, 12, 4).sum(2)
    assert (kept == 2).all()
    assert (res.weight[~res.mask] == 0).all()
    assert res.sparsity == 0.5
    r13 = sparsegpt_prune(W, H, 0.75, mask_structure="1:4")
    assert (r13.mask.reshape(16, 12, 4).sum(2) == 1).all()
    # decisions are taken at group starts on fully updated weights, so the block size does not matter
    for bs in (4, 6, 128):
        rb = sparsegpt_prune(W, H, mask_structure="2:4", block_size=bs, dtype=F64)
        r1 = sparsegpt_prune(W, H, mask_structure="2:4", block_size=1, dtype=F64)
        assert torch.equal(rb.mask, r1.mask)
        assert torch.allclose(rb.weight, r1.weight, atol=1e-6, rtol=0)


def test_sparsegpt_columns_last():
    C, K = 8, 9
    W, H = make_problem(rows=6, cols=C * K, seed=10)
    res = sparsegpt_prune(W, H, mask_structure="2:4", columns_last=K)
    # groups of 4 input channels at one kernel tap
    per_tap = res.mask.reshape(6, C, K).permute(0, 2, 1).reshape(6, K, C // 4, 4)
    assert (per_tap.sum(3) == 2).all()
    assert math.isclose(res.loss, layer_loss(W, res.weight, H), rel_tol=1e-5)
    res_u = sparsegpt_prune(W, H, 0.5, columns_last=K)
    assert int((~res_u.mask).sum()) == num_pruned(0.5, W.numel())


def test_sparsegpt_columns_last_with_group_grid():
    C, K = 8, 4
    W, H = make_problem(rows=6, cols=C * K, seed=15)
    grid = QuantGrid.fit(W, 3, strategy="group", group_size=8)
    res = sparsegpt_prune(W, H, mask_structure="2:4", grid=grid, columns_last=K)
    assert torch.equal(grid.quantize(res.weight), res.weight)
    assert (res.weight[~res.mask] == 0).all()


def test_sparsegpt_joint_quantization():
    W, H = make_problem(rows=16, cols=40, seed=11)
    grid = QuantGrid.fit(W, 4)
    for ms, sp in (("unstructured", 0.5), ("2:4", None)):
        res = sparsegpt_prune(W, H, sp, mask_structure=ms, grid=grid)
        assert (res.weight[~res.mask] == 0).all()
        assert torch.equal(grid.quantize(res.weight), res.weight)
        assert res.grid is grid and res.info["quantized"]
        assert math.isclose(res.loss, layer_loss(W, res.weight, H), rel_tol=1e-5)
        plain = sparsegpt_prune(W, H, sp, mask_structure=ms)
        assert res.loss >= plain.loss * 0.999


def test_sparsegpt_beats_magnitude():
    for seed in range(3):
        W, H = make_problem(rows=32, cols=48, seed=20 + seed)
        res = sparsegpt_prune(W, H, 0.5)
        assert res.loss < magnitude_loss(W, H, 0.5)
        res = sparsegpt_prune(W, H, mask_structure="2:4")
        assert res.loss < magnitude_loss(W, H, n=2, m=4)


def test_sparsegpt_zero_sparsity_keeps_weights():
    W, H = make_problem(rows=5, cols=12, seed=12)
    res = sparsegpt_prune(W, H, 0.0)
    assert res.mask.all() and torch.equal(res.weight, W) and res.loss == 0.0


def test_sparsegpt_dead_inputs():
    W, H = make_problem(rows=10, cols=20, seed=13, dead=(3, 4))
    res = sparsegpt_prune(W, H, 0.3)
    assert torch.isfinite(res.weight).all()
    assert (res.weight[:, [3, 4]] == 0).all()
    assert not res.mask[:, [3, 4]].any()  # free to prune: chosen first
    assert math.isclose(res.loss, layer_loss(W, res.weight, H), rel_tol=1e-5)


def test_sparsegpt_errors():
    W, H = make_problem(rows=8, cols=18)
    for bad in (1.0, -0.1, float("nan"), "half"):
        with pytest.raises(ValueError, match="sparsity"):
            sparsegpt_prune(W, H, bad)
    with pytest.raises(ValueError, match="sparsity"):
        sparsegpt_prune(W, H)
    with pytest.raises(ValueError, match="divisible"):
        sparsegpt_prune(W, H, mask_structure="2:4")
    with pytest.raises(ValueError, match="unstructured"):
        sparsegpt_prune(W, H, 0.5, mask_structure="block:2")
    with pytest.raises(ValueError, match="contradicts"):
        sparsegpt_prune(W[:, :16], H[:16, :16], 0.3, mask_structure="2:4")
    with pytest.raises(ValueError, match="block_size"):
        sparsegpt_prune(W, H, 0.5, block_size=0)
    with pytest.raises(ValueError, match="rows"):
        sparsegpt_prune(W, H, 0.5, grid=QuantGrid.fit(W[:3], 4))
    with pytest.raises(ValueError, match="columns_last"):
        sparsegpt_prune(W, H, 0.5, columns_last=4)
    with pytest.raises(ValueError, match="mask_structure"):
        sparsegpt_prune(W, H, 0.5, mask_structure="4:2")
    with pytest.raises(ValueError, match="2-D"):
        sparsegpt_prune(W[0], H, 0.5)
