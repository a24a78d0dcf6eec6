import math

import pytest
import torch

from obcompress.solvers.grid import QuantGrid, minmax_params


def _w(rows=8, cols=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Heavy-ish tails and a per-row scale so the clip search has something to do.
    return torch.randn(rows, cols, generator=g) ** 3 * torch.rand(rows, 1, generator=g)


def _distinct_per_row(Q):
    srt = Q.sort(dim=1).values
    return 1 + (srt.diff(dim=1) != 0).sum(dim=1)


def _pnorm_err(W, Q, p=2.4):
    return (W.double() - Q.double()).abs().pow(p).sum(dim=1)


STRATEGY_KW = [
    dict(strategy="channel"),
    dict(strategy="tensor"),
    dict(strategy="group", group_size=5),
    dict(strategy="group", group_size=6),  # does not divide 20 columns
]


def _units(strategy, group_size, cols):
    """Column slices over which one (scale, zero) applies."""
    if strategy == "group":
        return [slice(s, s + group_size) for s in range(0, cols, group_size)]
    return [slice(0, cols)]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("mse", [False, True])
@pytest.mark.parametrize("kw", STRATEGY_KW, ids=lambda kw: f"{kw['strategy']}{kw.get('group_size', '')}")
def test_at_most_2_pow_bits_values(bits, symmetric, mse, kw):
    W = _w()
    grid = QuantGrid.fit(W, bits, symmetric=symmetric, mse=mse, **kw)
    Q = grid.quantize(W)
    assert Q.shape == W.shape and Q.dtype == W.dtype
    assert torch.isfinite(Q).all()
    if kw["strategy"] == "tensor":
        assert grid.scale.shape == (1, 1)
        assert Q.unique().numel() <= 2**bits
        return
    expected_groups = math.ceil(20 / kw["group_size"]) if kw["strategy"] == "group" else 1
    assert grid.scale.shape == grid.zero.shape == (8, expected_groups)
    for sl in _units(kw["strategy"], kw.get("group_size"), 20):
        assert (_distinct_per_row(Q[:, sl]) <= 2**bits).all()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_symmetric_minmax_grid_is_the_reference_one(bits):
    W = _w(seed=1)
    grid = QuantGrid.fit(W, bits)
    maxq = 2**bits - 1
    torch.testing.assert_close(grid.scale[:, 0], 2 * W.abs().max(dim=1).values / maxq)
    assert (grid.zero == 2 ** (bits - 1)).all()
    assert grid.maxq == maxq


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_asymmetric_minmax_grid(bits):
    W = _w(seed=2) + 0.3  # rows with both signs and some all-positive
    grid = QuantGrid.fit(W, bits, symmetric=False)
    maxq = 2**bits - 1
    lo = W.min(dim=1).values.clamp(max=0)
    hi = W.max(dim=1).values.clamp(min=0)
    torch.testing.assert_close(grid.scale[:, 0], (hi - lo) / maxq)
    torch.testing.assert_close(grid.zero[:, 0], torch.round(-lo / grid.scale[:, 0]))
    # The range is covered: the extremes land within half a step.
    Q = grid.quantize(W)
    assert ((Q - W).abs() <= 0.5 * grid.scale + 1e-6).all()


def test_group_params_match_each_slice():
    W = _w(6, 23, seed=3)
    grid = QuantGrid.fit(W, 3, symmetric=False, strategy="group", group_size=8)
    assert grid.scale.shape == (6, 3)
    for g, sl in enumerate(_units("group", 8, 23)):
        s, z = minmax_params(W[:, sl], 3, symmetric=False)
        torch.testing.assert_close(grid.scale[:, g], s)
        torch.testing.assert_close(grid.zero[:, g], z)
    torch.testing.assert_close(grid.column_groups(23), torch.arange(23) // 8)


def test_tensor_strategy_uses_one_scale():
    W = _w(seed=4)
    grid = QuantGrid.fit(W, 4, strategy="tensor")
    torch.testing.assert_close(grid.scale, (2 * W.abs().max() / 15).reshape(1, 1))
    s, z = grid.expand(*W.shape)
    assert (s == grid.scale[0, 0]).all() and (z == 8).all()


@pytest.mark.parametrize("kw", STRATEGY_KW + [dict(strategy="channel", symmetric=False, mse=True)])
def test_encode_decode_round_trip_and_idempotence(kw):
    W = _w(seed=5)
    grid = QuantGrid.fit(W, 4, **kw)
    codes = grid.encode(W)
    assert codes.dtype == torch.uint8 and codes.shape == W.shape
    assert int(codes.max()) <= grid.maxq
    Q = grid.quantize(W)
    assert torch.equal(grid.decode(codes), Q)
    assert torch.equal(grid.encode(Q), codes)  # grid points encode to themselves
    assert torch.equal(grid.quantize(Q), Q)  # idempotent
    # Every code decodes to a point that encodes back to it.
    all_codes = torch.arange(grid.maxq + 1, dtype=torch.uint8).repeat(W.shape[0], W.shape[1] // 16 + 1)[:, : W.shape[1]]
    assert torch.equal(grid.encode(grid.decode(all_codes)), all_codes)


def test_quantize_keeps_dtype():
    for dtype in (torch.float64, torch.bfloat16, torch.float16):
        W = _w(seed=6).to(dtype)
        Q = QuantGrid.fit(W, 4).quantize(W)
        assert Q.dtype == dtype


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("strategy", ["channel", "tensor"])
def test_mse_clip_never_worse_than_minmax(bits, symmetric, strategy):
    W = _w(16, 40, seed=7)
    plain = QuantGrid.fit(W, bits, symmetric=symmetric, strategy=strategy)
    clipped = QuantGrid.fit(W, bits, symmetric=symmetric, strategy=strategy, mse=True)
    if strategy == "tensor":
        e_plain = _pnorm_err(W.reshape(1, -1), plain.quantize(W).reshape(1, -1))
        e_mse = _pnorm_err(W.reshape(1, -1), clipped.quantize(W).reshape(1, -1))
    else:
        e_plain, e_mse = _pnorm_err(W, plain.quantize(W)), _pnorm_err(W, clipped.quantize(W))
    assert (e_mse <= e_plain * (1 + 1e-5) + 1e-12).all()
    if bits <= 4:  # heavy tails at few bits: the search actually clips somewhere
        assert (clipped.scale < plain.scale).any()


def test_mse_clip_never_worse_per_group():
    W = _w(8, 30, seed=8)
    plain = QuantGrid.fit(W, 3, strategy="group", group_size=7)
    clipped = QuantGrid.fit(W, 3, strategy="group", group_size=7, mse=True)
    Qp, Qm = plain.quantize(W), clipped.quantize(W)
    for sl in _units("group", 7, 30):
        assert (_pnorm_err(W[:, sl], Qm[:, sl]) <= _pnorm_err(W[:, sl], Qp[:, sl]) * (1 + 1e-5) + 1e-12).all()


def test_zero_rows_and_exact_zeros():
    W = _w(4, 10, seed=9)
    W[1] = 0
    W[2, 3] = 0
    for symmetric in (True, False):
        grid = QuantGrid.fit(W, 4, symmetric=symmetric)
        assert (grid.scale > 0).all()
        Q = grid.quantize(W)
        assert (Q[1] == 0).all()
        assert Q[2, 3] == 0  # zero is a grid point (matters for joint prune + quantize)


def test_g_idx_overrides_consecutive_groups():
    W = _w(5, 12, seed=10)
    grid = QuantGrid.fit(W, 4, strategy="group", group_size=4)
    # The identity index reproduces the consecutive groups.
    same = QuantGrid(grid.bits, grid.scale, grid.zero, grid.symmetric, grid.strategy, grid.group_size, grid.mse,
                     g_idx=torch.arange(12) // 4)
    assert torch.equal(same.quantize(W), grid.quantize(W))
    # A scattered index: column c uses the scale and zero of group g_idx[c].
    g_idx = torch.tensor([2, 0, 1, 0, 2, 1, 1, 0, 2, 2, 0, 1])
    perm = QuantGrid(grid.bits, grid.scale, grid.zero, grid.symmetric, grid.strategy, grid.group_size, grid.mse,
                     g_idx=g_idx)
    torch.testing.assert_close(perm.column_groups(12), g_idx)
    s, z = perm.expand(5, 12)
    torch.testing.assert_close(s, grid.scale[:, g_idx])
    torch.testing.assert_close(z, grid.zero[:, g_idx])
    Q = perm.quantize(W)
    expected = grid.scale[:, g_idx] * (torch.clamp(torch.round(W / s) + z, 0, 15) - z)
    torch.testing.assert_close(Q, expected)
    for g in range(3):
        assert (_distinct_per_row(Q[:, g_idx == g]) <= 16).all()
    moved = perm.to("cpu")
    assert torch.equal(moved.g_idx, g_idx) and torch.equal(moved.quantize(W), Q)
    with pytest.raises(ValueError, match="group index"):
        perm.quantize(W[:, :10])


@pytest.mark.parametrize("bits", [1, 9, 0, 16, 4.0, True, "4", None])
def test_bits_outside_range_rejected(bits):
    with pytest.raises(ValueError, match="bits"):
        QuantGrid.fit(_w(), bits)


def test_fit_and_shape_errors():
    W = _w()
    with pytest.raises(ValueError, match="strategy"):
        QuantGrid.fit(W, 4, strategy="row")
    for gs in (None, 0, -3, 2.5):
        with pytest.raises(ValueError, match="group_size"):
            QuantGrid.fit(W, 4, strategy="group", group_size=gs)
    with pytest.raises(ValueError):
        QuantGrid.fit(torch.full((2, 3), float("nan")), 4)
    with pytest.raises(ValueError):
        QuantGrid.fit(W.flatten(), 4)
    with pytest.raises(ValueError):
        QuantGrid.fit(torch.empty(0, 4), 4)
    grid = QuantGrid.fit(W, 4)
    with pytest.raises(ValueError, match="rows"):
        grid.quantize(W[:5])
    with pytest.raises(ValueError, match="2-D"):
        grid.encode(W.flatten())
    with pytest.raises(ValueError, match="rows"):
        grid.decode(torch.zeros(3, 20, dtype=torch.uint8))
    # A per-tensor grid applies to any 2-D shape.
    tgrid = QuantGrid.fit(W, 4, strategy="tensor")
    assert tgrid.quantize(W[:3]).shape == (3, 20)
