import math

import pytest
import torch

from obcompress.solvers._common import columns_last_perm, layer_loss, num_pruned
from obcompress.solvers.baselines import magnitude_prune, rtn_quantize
from obcompress.solvers.grid import QuantGrid
from obcompress.solvers.hessian import hessian


def _w(rows=6, cols=16, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def _h(cols, seed=1):
    return hessian(torch.randn(4 * cols, cols, generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.25, 0.5, 0.73, 0.99])
@pytest.mark.parametrize("shape", [(6, 16), (1, 7), (5, 3)])
def test_unstructured_exact_count_and_smallest(sparsity, shape):
    W = _w(*shape, seed=3)
    res = magnitude_prune(W, sparsity)
    k = num_pruned(sparsity, W.numel())
    assert res.mask.dtype == torch.bool and res.mask.shape == W.shape
    assert int((~res.mask).sum()) == k
    assert res.method == "magnitude"
    assert torch.equal(res.weight[res.mask], W[res.mask])
    assert (res.weight[~res.mask] == 0).all()
    if 0 < k < W.numel():
        assert W.abs()[~res.mask].max() <= W.abs()[res.mask].min()
    assert math.isnan(res.loss)


def test_unstructured_ties_are_deterministic():
    W = torch.tensor([[1.0, -1.0, 1.0, 2.0], [-1.0, 1.0, 3.0, 1.0]])
    res = magnitude_prune(W, 0.5)
    # Six weights tie at |w| = 1 and four are pruned: those with the lowest flat index.
    expected = torch.tensor([[False, False, False, True], [False, True, True, True]])
    assert torch.equal(res.mask, expected)
    assert torch.equal(magnitude_prune(W.clone(), 0.5).mask, res.mask)


def test_keeps_dtype_and_does_not_modify_input():
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        W = _w().to(dtype)
        W0 = W.clone()
        res = magnitude_prune(W, 0.5)
        assert res.weight.dtype == dtype and res.weight.shape == W.shape
        assert torch.equal(W, W0)
        assert int((~res.mask).sum()) == num_pruned(0.5, W.numel())


def test_loss_with_h():
    W, H = _w(4, 12), _h(12)
    res = magnitude_prune(W, 0.4, H=H)
    assert math.isclose(res.loss, layer_loss(W, res.weight, H), rel_tol=1e-12)
    assert res.loss > 0
    assert magnitude_prune(W, 0.0, H=H).loss == 0.0


@pytest.mark.parametrize("structure,n,m", [("2:4", 2, 4), ("1:4", 1, 4), ("3:8", 3, 8), ("1:2", 1, 2)])
def test_nm_keeps_n_largest_of_every_m(structure, n, m):
    W = _w(5, 24, seed=4)
    res = magnitude_prune(W, mask_structure=structure)
    groups = res.mask.reshape(5, -1, m)
    assert (groups.sum(-1) == n).all()
    A = W.abs().reshape(5, -1, m)
    kept_min = torch.where(groups, A, torch.full_like(A, float("inf"))).min(-1).values
    pruned_max = torch.where(~groups, A, torch.full_like(A, -1.0)).max(-1).values
    assert (pruned_max <= kept_min).all()
    assert math.isclose(res.sparsity, (m - n) / m)
    # The structure's own sparsity may also be passed explicitly.
    assert torch.equal(magnitude_prune(W, (m - n) / m, structure).mask, res.mask)


def test_nm_ties_keep_lower_index():
    W = torch.ones(2, 8)
    res = magnitude_prune(W, mask_structure="2:4")
    assert torch.equal(res.mask, torch.tensor([[True, True, False, False] * 2] * 2))


def test_nm_columns_last_groups_channels_at_one_tap():
    O, C, K = 4, 8, 9  # a 3x3 conv with 8 input channels, flattened as (C, kh, kw)
    W4 = torch.randn(O, C, 3, 3, generator=torch.Generator().manual_seed(5))
    W = W4.flatten(1)
    res = magnitude_prune(W, mask_structure="2:4", columns_last=K)
    mask4 = res.mask.reshape(O, C, 3, 3)
    # Groups of 4 consecutive channels at each kernel tap keep exactly 2.
    assert (mask4.reshape(O, C // 4, 4, 3, 3).sum(2) == 2).all()
    # Same as pruning the (K, C)-ordered weight and putting the columns back.
    perm = columns_last_perm(C * K, K)
    direct = magnitude_prune(W[:, perm], mask_structure="2:4").mask
    assert torch.equal(res.mask[:, perm], direct)
    assert torch.equal(res.weight, W * res.mask)
    # Without the reordering the groups run over kernel taps of one channel instead.
    plain = magnitude_prune(W, mask_structure="2:4").mask
    assert (plain.reshape(O, -1, 4).sum(-1) == 2).all()
    assert not torch.equal(plain, res.mask)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_block_prunes_whole_blocks_with_smallest_norm(sparsity):
    rows, cols, c = 6, 16, 4
    W = _w(rows, cols, seed=6)
    res = magnitude_prune(W, sparsity, "block:4")
    blocks = res.mask.reshape(rows, cols // c, c)
    assert (blocks.all(-1) | (~blocks).all(-1)).all()  # whole blocks only
    pruned_blocks = (~blocks).all(-1)
    assert int(pruned_blocks.sum()) == num_pruned(sparsity, rows * cols // c)
    norms = W.double().reshape(rows, cols // c, c).norm(dim=-1)
    if pruned_blocks.any() and (~pruned_blocks).any():
        assert norms[pruned_blocks].max() <= norms[~pruned_blocks].min()
    assert (res.weight[~res.mask] == 0).all()


def test_block_with_columns_last():
    O, C, K = 3, 8, 4
    W = _w(O, C * K, seed=7)
    res = magnitude_prune(W, 0.5, "block:4", columns_last=K)
    perm = columns_last_perm(C * K, K)
    mp = res.mask[:, perm].reshape(O, -1, 4)
    assert (mp.all(-1) | (~mp).all(-1)).all()
    assert int((~mp).all(-1).sum()) == num_pruned(0.5, O * C * K // 4)
    assert torch.equal(res.mask[:, perm], magnitude_prune(W[:, perm], 0.5, "block:4").mask)


def test_block_1_is_unstructured():
    W = _w(seed=8)
    assert torch.equal(magnitude_prune(W, 0.37, "block:1").mask, magnitude_prune(W, 0.37).mask)


def test_magnitude_errors():
    W = _w(4, 12)
    cases = [
        dict(W=W),  # sparsity required for unstructured
        dict(W=W, mask_structure="block:4"),  # ... and for blocks
        dict(W=W, sparsity=1.0),
        dict(W=W, sparsity=-0.1),
        dict(W=W, sparsity=float("nan")),
        dict(W=W, sparsity="half"),
        dict(W=W, mask_structure="2:8"),  # 12 columns not divisible by 8
        dict(W=W, sparsity=0.5, mask_structure="block:5"),
        dict(W=W, mask_structure="4:4"),
        dict(W=W, sparsity=0.5, mask_structure="diagonal"),
        dict(W=W, sparsity=0.3, mask_structure="2:4"),  # contradicts the 50% of 2:4
        dict(W=W, sparsity=0.5, H=torch.eye(11)),
        dict(W=W, sparsity=0.5, H=torch.full((12, 12), float("nan"))),
        dict(W=W.flatten(), sparsity=0.5),
        dict(W=torch.full((2, 4), float("inf")), sparsity=0.5),
        dict(W=torch.ones(2, 4, dtype=torch.int64), sparsity=0.5),
        dict(W=W, mask_structure="2:4", columns_last=5),
        dict(W=W, sparsity=0.5, columns_last=0),
    ]
    for kw in cases:
        with pytest.raises(ValueError):
            magnitude_prune(**kw)


@pytest.mark.parametrize(
    "fit_kw",
    [
        dict(bits=4),
        dict(bits=3, symmetric=False),
        dict(bits=2, strategy="tensor"),
        dict(bits=4, strategy="group", group_size=5),
        dict(bits=8, mse=True),
    ],
)
def test_rtn_is_round_to_nearest(fit_kw):
    W, H = _w(6, 16, seed=9), _h(16)
    grid = QuantGrid.fit(W, **fit_kw)
    res = rtn_quantize(W, grid, H=H)
    assert res.method == "rtn" and res.grid is grid and res.mask is None
    assert res.weight.dtype == W.dtype and res.weight.shape == W.shape
    assert torch.equal(res.weight, grid.quantize(W))
    assert math.isclose(res.loss, layer_loss(W, res.weight, H), rel_tol=1e-12)
    # Nearest: no grid point of the same row/column is closer than the one chosen (up to float slack).
    s, z = grid.expand(*W.shape)
    codes = torch.arange(grid.maxq + 1, dtype=torch.float32)
    points = s[..., None] * (codes - z[..., None])  # (rows, cols, 2^bits)
    best = (points - W[..., None]).abs().min(-1).values
    assert ((res.weight - W).abs() <= best + 1e-6 * s).all()
    assert math.isnan(rtn_quantize(W, grid).loss)


def test_rtn_errors():
    W = _w(6, 16)
    grid = QuantGrid.fit(W, 4)
    with pytest.raises(ValueError, match="QuantGrid"):
        rtn_quantize(W, 4)
    with pytest.raises(ValueError):
        rtn_quantize(_w(5, 16), grid)  # grid fitted for 6 rows
    with pytest.raises(ValueError):
        rtn_quantize(W, grid, H=torch.eye(15))
    with pytest.raises(ValueError):
        rtn_quantize(torch.full((6, 16), float("nan")), grid)
    group_grid = QuantGrid.fit(W, 4, strategy="group", group_size=4)  # 4 groups of 4 columns
    with pytest.raises(ValueError, match="groups"):
        rtn_quantize(W[:, :12], group_grid)
