import math

import pytest
import torch

from obcompress.solvers._common import (
    AUTO_DAMP_LEVELS,
    SolverResult,
    check_hessian,
    check_weight,
    columns_last_perm,
    layer_loss,
    num_pruned,
    prepare_layer,
)
from obcompress.solvers.hessian import hessian


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- layer_loss


@pytest.mark.parametrize("rows,cols,n", [(1, 1, 3), (4, 7, 50), (9, 16, 5)])
def test_layer_loss_is_mean_squared_output_error(rows, cols, n):
    g = _gen(rows * 100 + cols)
    X = torch.randn(n, cols, generator=g)
    W = torch.randn(rows, cols, generator=g)
    W_hat = W + 0.3 * torch.randn(rows, cols, generator=g)
    H = hessian(X)  # 2 X^T X / N
    D = W.double() - W_hat.double()
    brute = float(((D @ X.double().t()) ** 2).sum()) / n  # ||(W - W_hat) X^T||^2 / N
    assert math.isclose(layer_loss(W, W_hat, H), brute, rel_tol=1e-10)
    # Same value from float32 H: the loss is accumulated in float64 either way.
    assert math.isclose(layer_loss(W, W_hat, H.float()), brute, rel_tol=1e-5)


def test_layer_loss_basic_properties():
    g = _gen(1)
    W = torch.randn(3, 5, generator=g)
    H = hessian(torch.randn(20, 5, generator=g))
    assert layer_loss(W, W, H) == 0.0
    W_hat = W + torch.randn(3, 5, generator=g)
    assert layer_loss(W, W_hat, H) > 0
    # Rows add up independently.
    per_row = sum(layer_loss(W[r : r + 1], W_hat[r : r + 1], H) for r in range(3))
    assert math.isclose(layer_loss(W, W_hat, H), per_row, rel_tol=1e-12)
    assert math.isclose(layer_loss(W.double(), W_hat.half(), H), layer_loss(W, W_hat.half().float(), H), rel_tol=1e-12)
    with pytest.raises(ValueError, match="shape"):
        layer_loss(W, W_hat[:, :4], H)


# ---------------------------------------------------------------- mask structures


def test_columns_last_perm():
    assert columns_last_perm(6, None) is None
    assert columns_last_perm(6, 1) is None
    assert columns_last_perm(6, 3).tolist() == [0, 3, 1, 4, 2, 5]
    # On a conv weight flattened (C, K) the permutation gives (K, C).
    W4 = torch.randn(2, 4, 3, 3, generator=_gen(2))
    perm = columns_last_perm(36, 9)
    assert torch.equal(W4.flatten(1)[:, perm], W4.permute(0, 2, 3, 1).flatten(1))
    for bad in (5, 0, -3, 2.0):
        with pytest.raises(ValueError, match="columns_last"):
            columns_last_perm(36, bad)


# ---------------------------------------------------------------- small checks


def test_num_pruned_rounds_half_up():
    assert num_pruned(0.5, 5) == 3
    assert num_pruned(0.25, 10) == 3
    assert num_pruned(0.3, 10) == 3
    assert num_pruned(0.0, 10) == 0
    assert num_pruned(0.999, 10) == 10
    assert num_pruned(0.5, 1) == 1
    assert num_pruned(0.49, 1) == 0


def test_check_weight_errors():
    check_weight(torch.randn(2, 3))
    bad = [
        (torch.randn(3), "2-D"),
        (torch.randn(1, 2, 3), "2-D"),
        (torch.empty(0, 3), "empty"),
        (torch.ones(2, 3, dtype=torch.int32), "floating"),
        (torch.tensor([[1.0, float("nan")]]), "non-finite"),
        (torch.tensor([[float("inf"), 1.0]]), "non-finite"),
        ([[1.0]], "torch.Tensor"),
    ]
    for W, msg in bad:
        with pytest.raises(ValueError, match=msg):
            check_weight(W)


def test_check_hessian_errors():
    check_hessian(torch.eye(3), 3)
    bad = [
        (torch.eye(4), "columns"),
        (torch.ones(3, 4), "square"),
        (torch.ones(2, 3, 3), "square"),
        (torch.ones(3), "square"),
        (torch.tensor([[1.0, float("nan"), 0], [0, 1, 0], [0, 0, 1]]), "non-finite"),
        (torch.diag(torch.tensor([1.0, -1.0, 1.0])), "negative diagonal"),
        (torch.eye(3).numpy(), "torch.Tensor"),
    ]
    for H, msg in bad:
        with pytest.raises(ValueError, match=msg):
            check_hessian(H, 3)


def test_solver_result_sparsity():
    r = SolverResult(weight=torch.zeros(2, 2), loss=0.0, mask=torch.tensor([[True, False], [False, False]]))
    assert r.sparsity == 0.75
    assert SolverResult(weight=torch.zeros(2, 2), loss=0.0).sparsity == 0.0


# ---------------------------------------------------------------- prepare_layer


def _full_rank(cols, seed=3, n=None):
    X = torch.randn(n or 10 * cols, cols, generator=_gen(seed), dtype=torch.float64)
    return X, hessian(X)


def test_prepare_layer_full_rank_uses_no_damp():
    X, H = _full_rank(6)
    W = torch.randn(3, 6, generator=_gen(4))
    p = prepare_layer(W, H)
    assert p.damp == 0.0
    assert p.W.dtype == p.H.dtype == p.Hinv.dtype == p.L.dtype == torch.float64
    torch.testing.assert_close(p.H, H)
    torch.testing.assert_close(p.L @ p.L.t(), p.H)
    torch.testing.assert_close(p.H @ p.Hinv, torch.eye(6, dtype=torch.float64))
    torch.testing.assert_close(p.W, W.double())
    assert not p.dead.any()


def test_prepare_layer_dead_inputs():
    X, _ = _full_rank(7, seed=5)
    X[:, [1, 4]] = 0
    H = hessian(X)
    W = torch.randn(3, 7, generator=_gen(6))
    W0 = W.clone()
    p = prepare_layer(W, H)
    assert p.dead.tolist() == [False, True, False, False, True, False, False]
    assert (p.W[:, p.dead] == 0).all()
    torch.testing.assert_close(p.W[:, ~p.dead], W[:, ~p.dead].double())
    assert torch.equal(W, W0)  # the caller's W is not touched
    # Dead rows/cols of H are decoupled and the factorisation exists without damping.
    for d in (1, 4):
        assert p.H[d, d] > 0
        off = torch.cat([p.H[d, :d], p.H[d, d + 1 :]])
        assert (off == 0).all()
    assert p.damp == 0.0
    torch.testing.assert_close(p.H @ p.Hinv, torch.eye(7, dtype=torch.float64))
    # Zeroing dead weights changes nothing in the layer output.
    assert layer_loss(W, p.W, H) == 0.0


def test_prepare_layer_auto_damp_on_rank_deficient_h():
    cols = 10
    X = torch.randn(4, cols, generator=_gen(7), dtype=torch.float64)  # rank 4 < 10, no dead inputs
    H = hessian(X)
    assert (torch.diagonal(H) > 0).all()
    p = prepare_layer(torch.randn(2, cols), H)
    # a singular H: no tiny lambda that would let the weights drift along the unseen directions
    assert p.damp == 1e-2 and p.damp in AUTO_DAMP_LEVELS
    lam = p.damp * float(torch.diagonal(H).mean())
    torch.testing.assert_close(p.H, H + lam * torch.eye(cols, dtype=torch.float64))
    torch.testing.assert_close(p.L @ p.L.t(), p.H)
    # Without damping the same H is rejected with a clear message.
    with pytest.raises(ValueError, match="not positive definite"):
        prepare_layer(torch.randn(2, cols), H, damp=0.0)


def test_prepare_layer_explicit_damp_is_used_as_is():
    _, H = _full_rank(5, seed=8)
    p = prepare_layer(torch.randn(2, 5), H, damp=0.01)
    assert p.damp == 0.01
    torch.testing.assert_close(p.H, H + 0.01 * float(torch.diagonal(H).mean()) * torch.eye(5, dtype=torch.float64))


def test_prepare_layer_errors():
    W = torch.randn(3, 4)
    _, H = _full_rank(4, seed=9)
    cases = [
        (torch.tensor([[float("nan")] * 4] * 3), H, "non-finite"),
        (W, H.clone().fill_(float("inf")), "non-finite"),
        (W, torch.eye(5, dtype=torch.float64), "columns"),
        (W, torch.ones(4, 5), "square"),
        (W.flatten(), H, "2-D"),
    ]
    for Wc, Hc, msg in cases:
        with pytest.raises(ValueError, match=msg):
            prepare_layer(Wc, Hc)
    for damp in (-0.1, float("nan"), "big", True):
        with pytest.raises(ValueError, match="damp"):
            prepare_layer(W, H, damp=damp)


def test_prepare_layer_dead_inputs_with_small_activations():
    X, _ = _full_rank(8, seed=10)
    X = X * 1e-6
    X[:, 3] = 0
    p = prepare_layer(torch.randn(2, 8), hessian(X))
    assert p.dead[3] and p.damp == 0.0


def test_layer_loss_rejects_mismatched_h():
    with pytest.raises(ValueError):
        layer_loss(torch.randn(2, 3), torch.randn(2, 3), torch.eye(4))


def test_all_inputs_dead_gives_zero_weights_at_zero_loss():
    from obcompress.solvers import QuantGrid, exact_obs_prune, gptq_quantize, obq_quantize

    W = torch.randn(3, 8)
    H = torch.zeros(8, 8, dtype=torch.float64)
    p = prepare_layer(W, H)
    assert p.dead.all() and (p.W == 0).all()
    grid = QuantGrid.fit(W, 4)
    for result in (obq_quantize(W, H, grid), exact_obs_prune(W, H, 0.5), gptq_quantize(W, H, grid)):
        assert (result.weight == 0).all() and result.loss == 0


def test_one_thread_is_the_calling_threads_and_restores_its_count():
    import threading

    from obcompress.solvers._common import one_thread

    g = torch.Generator().manual_seed(0)
    X = torch.randn(1200, 300, generator=g, dtype=torch.float64)
    H = X.t() @ X

    def factor():
        return torch.cholesky_inverse(torch.linalg.cholesky(H))

    threads = torch.get_num_threads()
    seen = {}
    try:
        torch.set_num_threads(1)
        serial = factor()
        torch.set_num_threads(2)

        def worker():
            with one_thread():
                seen["worker inside"] = torch.get_num_threads()
                seen["worker bits"] = factor()
            seen["worker after"] = torch.get_num_threads()

        with one_thread():
            seen["main inside"] = torch.get_num_threads()
            seen["main bits"] = factor()
        with one_thread("meta"):  # work on another device leaves the CPU's threads alone
            seen["other device"] = torch.get_num_threads()
        t = threading.Thread(target=worker)
        t.start()
        t.join(30)
        seen["main after"] = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
    assert seen["main inside"] == seen["worker inside"] == 1
    assert seen["main after"] == seen["worker after"] == seen["other device"] == 2
    assert torch.equal(seen["main bits"], serial) and torch.equal(seen["worker bits"], serial)


def test_serial_sum_is_the_one_thread_sum_at_any_thread_count():
    from obcompress.solvers._common import serial_sum

    x = torch.randn(3_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = float(x.sum())
        torch.set_num_threads(2)
        assert serial_sum(x) == one and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
