import itertools

import pytest
import torch

from obcompress.solvers._common import layer_loss, num_pruned
from obcompress.solvers._elimination import refit_on_support
from obcompress.solvers.obs import exact_obs_database, exact_obs_prune
from reference_obs import block_row, correlated_problem, obs_row, prune_chooser, spectrum_problem

# Columns above the flush interval (32) and enough eliminations to trigger compaction, so the
# delayed updates and the compaction are both exercised against the reference.

@pytest.fixture(autouse=True)
def _both_engines(engine):
    return engine

COLS = 72


def _ref_trajectories(W, H, steps, nm=None):
    Hinv = torch.linalg.inv(H.double())
    out = [obs_row(W[r], Hinv, steps, choose=prune_chooser(nm), target=lambda p, w: 0.0) for r in range(W.shape[0])]
    return [o[0] for o in out], torch.tensor([o[1] for o in out], dtype=torch.float64)


def test_unstructured_orders_and_losses_match_plain_reference():
    W, H = correlated_problem(5, COLS, seed=1)
    db = exact_obs_database(W, H, damp=0, dtype=torch.float64)
    orders, losses = _ref_trajectories(W, H, COLS)
    assert db.order.tolist() == orders
    torch.testing.assert_close(db.losses.double(), losses, rtol=1e-4, atol=1e-9)


def test_float32_loop_follows_reference_closely():
    W, H = correlated_problem(4, COLS, seed=2)
    db = exact_obs_database(W, H, damp=0, dtype=torch.float32)
    orders, losses = _ref_trajectories(W, H, COLS // 2)
    # The first half of every path is identical (no near-ties there on this problem).
    assert db.order[:, : COLS // 2].tolist() == orders
    torch.testing.assert_close(db.losses[:, : COLS // 2].double(), losses, rtol=2e-3, atol=1e-6)


@pytest.mark.parametrize("keep,m", [(2, 4), (1, 4), (4, 8)])
def test_nm_orders_match_reference(keep, m):
    W, H = correlated_problem(4, COLS, seed=3)
    steps = COLS * (m - keep) // m
    db = exact_obs_database(W, H, mask_structure=f"{keep}:{m}", damp=0, dtype=torch.float64)
    orders, losses = _ref_trajectories(W, H, steps, nm=(keep, m))
    assert db.order.tolist() == orders
    torch.testing.assert_close(db.losses.double(), losses, rtol=1e-4, atol=1e-9)


def test_block_orders_match_reference():
    W, H = correlated_problem(3, 48, seed=4)
    db = exact_obs_database(W, H, mask_structure="block:4", damp=0, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    for r in range(3):
        order, losses = block_row(W[r], Hinv, 4)
        assert db.order[r].tolist() == order
        torch.testing.assert_close(db.losses[r].double(), torch.tensor(losses, dtype=torch.float64), rtol=1e-4, atol=1e-9)


def test_first_step_is_optimal_by_brute_force():
    # Among all single weights, the OBS choice and its loss equal the best constrained least squares.
    W, H = correlated_problem(3, 6, seed=5)
    db = exact_obs_database(W, H, damp=0, dtype=torch.float64)
    for r in range(3):
        best = []
        for p in range(6):
            keep = torch.ones(1, 6, dtype=torch.bool)
            keep[0, p] = False
            w = refit_on_support(W[r : r + 1], H, torch.linalg.inv(H), keep)
            best.append(layer_loss(W[r : r + 1], w, H))
        assert int(db.order[r, 0]) == min(range(6), key=best.__getitem__)
        assert db.losses[r, 0].item() == pytest.approx(min(best), rel=1e-5)


def test_refit_is_the_best_weights_on_the_support():
    # Brute force: every support of size 3 in 6 columns, against a direct solve of the normal equations.
    W, H = correlated_problem(2, 6, seed=6)
    Hinv = torch.linalg.inv(H)
    for kept in itertools.combinations(range(6), 3):
        keep = torch.zeros(2, 6, dtype=torch.bool)
        keep[:, list(kept)] = True
        w = refit_on_support(W, H, Hinv, keep)
        S = list(kept)
        P = [c for c in range(6) if c not in kept]
        direct = W[:, S] + (torch.linalg.solve(H[S][:, S], H[S][:, P] @ W[:, P].T)).T
        torch.testing.assert_close(w[:, S], direct)
        assert (w[:, P] == 0).all()


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.37, 0.5, 0.9])
def test_unstructured_counts_and_reported_loss(sparsity):
    W, H = correlated_problem(6, COLS, seed=7, dtype=torch.float32)
    r = exact_obs_prune(W, H, sparsity, damp=0)
    assert (~r.mask).sum().item() == num_pruned(sparsity, W.numel())
    assert (r.weight[~r.mask] == 0).all()
    assert r.weight.dtype == W.dtype and r.weight.shape == W.shape
    assert r.loss == pytest.approx(layer_loss(W, r.weight, H), rel=1e-5)
    # The greedy steps' losses add up to the loss of the re-fitted weights.
    assert r.info["predicted_loss"] == pytest.approx(r.loss, rel=1e-3, abs=1e-6)


def test_database_levels_are_nested_and_losses_grow():
    W, H = correlated_problem(5, COLS, seed=8)
    db = exact_obs_database(W, H, damp=0, dtype=torch.float64)
    prev_mask, prev_loss = None, -1.0
    for s in (0.2, 0.4, 0.6, 0.8):
        r = db.at(s)
        assert r.loss >= prev_loss
        if prev_mask is not None:
            assert (r.mask <= prev_mask).all()  # a pruned weight stays pruned at higher sparsity
        prev_mask, prev_loss = r.mask, r.loss
    # A database costs O(rows x cols): one int32 order and one float32 loss per step.
    assert db.nbytes == W.numel() * 8
    torch.testing.assert_close(db.at(0.4).weight, exact_obs_prune(W, H, 0.4, damp=0, dtype=torch.float64).weight)


def test_global_selection_beats_uniform_rows():
    W, H = correlated_problem(8, COLS, seed=9)
    W[:4] *= 10  # rows of very different scales should get different sparsities
    r = exact_obs_prune(W, H, 0.5, damp=0, dtype=torch.float64)
    per_row = (~r.mask).sum(1)
    assert per_row[:4].float().mean() < per_row[4:].float().mean()


@pytest.mark.parametrize("structure", ["2:4", "1:4", "4:8"])
def test_nm_groups_are_valid(structure):
    keep, m = (int(t) for t in structure.split(":"))
    W, H = correlated_problem(6, COLS, seed=10, dtype=torch.float32)
    r = exact_obs_prune(W, H, mask_structure=structure, damp=0)
    groups = r.mask.reshape(6, -1, m).sum(2)
    assert (groups == keep).all()
    assert r.loss == pytest.approx(layer_loss(W, r.weight, H), rel=1e-5)


def test_nm_columns_last_groups_channels_at_each_tap():
    C, K = 16, 9  # a 3x3 conv with 16 input channels, flattened as (C, kh, kw)
    W, H = correlated_problem(4, C * K, seed=11, dtype=torch.float32)
    r = exact_obs_prune(W, H, mask_structure="2:4", columns_last=K, damp=0)
    by_tap = r.mask.reshape(4, C, K).permute(0, 2, 1)  # (rows, taps, channels)
    assert (by_tap.reshape(4, K, C // 4, 4).sum(3) == 2).all()


def test_blocks_are_whole():
    W, H = correlated_problem(5, 48, seed=12, dtype=torch.float32)
    r = exact_obs_prune(W, H, 0.5, mask_structure="block:4", damp=0)
    blocks = r.mask.reshape(5, 12, 4)
    assert (blocks.all(2) | (~blocks).all(2)).all()
    assert (~blocks.all(2)).sum().item() == num_pruned(0.5, 5 * 12)
    assert r.loss == pytest.approx(layer_loss(W, r.weight, H), rel=1e-5)


def test_exact_beats_magnitude():
    W, H = correlated_problem(6, COLS, seed=13, dtype=torch.float32)
    r = exact_obs_prune(W, H, 0.5, damp=0)
    k = num_pruned(0.5, W.numel())
    thr = W.abs().flatten().sort().values[k - 1]
    mag = torch.where(W.abs() > thr, W, torch.zeros(()))
    assert r.loss < layer_loss(W, mag, H)


def test_dead_inputs_and_rank_deficient_hessian():
    g = torch.Generator().manual_seed(14)
    X = torch.randn(20, 40, generator=g, dtype=torch.float64)  # 20 samples < 40 columns
    X[:, 5] = 0
    H = 2 * X.T @ X / 20
    W = torch.randn(3, 40, generator=g)
    r = exact_obs_prune(W, H, 0.5)
    assert torch.isfinite(r.weight).all()
    assert r.damp > 0
    assert r.loss == pytest.approx(layer_loss(W, r.weight, H), rel=1e-5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(sparsity=1.0), "sparsity"),
        (dict(sparsity=-0.1), "sparsity"),
        (dict(sparsity=None), "sparsity is required"),
        (dict(sparsity=None, mask_structure="2:5"), "not divisible"),
        (dict(sparsity=0.5, mask_structure="3:2"), "N < M"),
        (dict(sparsity=0.5, mask_structure="block:5"), "not divisible"),
        (dict(sparsity=0.5, mask_structure="diagonal"), "unknown mask_structure"),
        (dict(sparsity=0.3, mask_structure="2:4"), "contradicts mask_structure 2:4"),
        (dict(sparsity=0.5, columns_last=7), "columns_last"),
        (dict(sparsity=0.5, damp=-1), "damp"),
    ],
)
def test_bad_arguments(kwargs, match):
    W, H = correlated_problem(2, 24, seed=15)
    with pytest.raises(ValueError, match=match):
        exact_obs_prune(W, H, **kwargs)


def test_nm_database_holds_its_own_level_only():
    W, H = correlated_problem(2, 24, seed=17)
    db = exact_obs_database(W, H, mask_structure="2:4")
    assert db.at(None).sparsity == 0.5 and db.at(0.5).sparsity == 0.5
    with pytest.raises(ValueError, match="holds sparsity 0.5 only"):
        db.at(0.3)


def test_bad_tensors():
    W, H = correlated_problem(2, 8, seed=16)
    Wn = W.clone()
    Wn[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        exact_obs_prune(Wn, H, 0.5)
    with pytest.raises(ValueError, match="columns"):
        exact_obs_prune(W, H[:7, :7], 0.5)
    with pytest.raises(ValueError, match="square"):
        exact_obs_prune(W, H[:, :7], 0.5)
    with pytest.raises(ValueError, match="positive definite"):
        exact_obs_prune(W, 2 * torch.ones(8, 8, dtype=torch.float64) - torch.eye(8, dtype=torch.float64), 0.5, damp=0)
    with pytest.raises(ValueError, match="empty"):
        exact_obs_prune(torch.zeros(0, 8), H, 0.5)


@pytest.mark.parametrize("cond_scale", [1.0, 1e-4])
def test_mixed_precision_refit_matches_float64(cond_scale):
    # float32 factors refined to float64 accuracy, or (ill-conditioned) the float64 fallback.
    W, H = correlated_problem(6, 40, seed=18)
    evals, evecs = torch.linalg.eigh(H)
    H = (evecs * torch.linspace(cond_scale, 1.0, 40, dtype=torch.float64)) @ evecs.T * evals.max()
    g = torch.Generator().manual_seed(1)
    keep = torch.rand(6, 40, generator=g) > torch.linspace(0.2, 0.8, 6)[:, None]
    Hinv = torch.linalg.inv(H)
    exact = refit_on_support(W, H, Hinv, keep)
    fast = refit_on_support(W, H, Hinv, keep, fast=True)
    torch.testing.assert_close(fast, exact, rtol=1e-8, atol=1e-10)


def test_chunks_on_several_threads_give_the_same_result(monkeypatch):
    # Small chunks force several of them; with 2 torch threads they run concurrently.
    import obcompress.solvers._elimination as E

    W, H = correlated_problem(12, COLS, seed=19, dtype=torch.float32)
    one = exact_obs_database(W, H, damp=0)
    monkeypatch.setattr(E, "CHUNK_BYTES_NATIVE", 3 * COLS * COLS * 4)
    monkeypatch.setattr(E, "CHUNK_ELEMS_TORCH", 3 * COLS)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        many = exact_obs_database(W, H, damp=0)
        blocks = exact_obs_database(W, H, mask_structure="block:4", damp=0)
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads
    assert torch.equal(one.order, many.order)
    torch.testing.assert_close(one.losses, many.losses)
    assert torch.equal(blocks.order, exact_obs_database(W, H, mask_structure="block:4", damp=0).order)


def test_the_exact_solvers_give_the_same_bits_on_one_and_two_threads():
    # Columns spanning two decades: MKL's threaded Cholesky of this H rounds differently on two
    # threads, which the float32 loop carried into the database's losses and order before H was
    # factored on one thread (measured on this problem; digits-cnn's conv2 too),
    # and the per-row factorizations of a support into joint OBC's codes (digits-cnn's fc1).
    from obcompress.solvers import QuantGrid, hessian, obq_quantize, support_refit

    g = torch.Generator().manual_seed(1)
    X = torch.randn(1152, 288, generator=g, dtype=torch.float64) @ torch.randn(288, 288, generator=g, dtype=torch.float64)
    H = hessian(X * torch.logspace(0, -2, 288, dtype=torch.float64))
    W = torch.randn(16, 288, generator=g)
    grid = QuantGrid.fit(W, 4)
    mask = torch.rand(16, 288, generator=g) > 0.5
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            db = exact_obs_database(W, H)
            obc = obq_quantize(W, H, grid, mask=mask)
            runs.append((db.losses, db.order, exact_obs_prune(W, H, mask_structure="2:4").weight, obc.weight,
                         support_refit(W, H, mask), torch.tensor([db.predicted_loss(0.5), obc.loss])))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*runs):
        assert torch.equal(one, two)


@pytest.mark.parametrize("exponent", [4, 8, 10, 12, 14])
@pytest.mark.parametrize("structure", ["unstructured", "2:4", "block:4"])
def test_ill_conditioned_hessian_matches_the_float64_loop(exponent, structure):
    # cond(H) = 10^exponent. N:M kept the float32 loop's own final weights, 18-70x off at 1e12.
    W, H = spectrum_problem(8, 48, exponent, seed=exponent)
    sparsity = None if structure == "2:4" else 0.5
    r = exact_obs_prune(W, H, sparsity, structure)
    ref = exact_obs_prune(W, H, sparsity, structure, damp=r.damp, dtype=torch.float64)
    assert r.loss == pytest.approx(ref.loss, rel=2e-2)


def test_nm_rows_that_drift_in_a_forced_float32_loop_are_refitted():
    W, H = spectrum_problem(8, 48, 12, seed=3)
    r = exact_obs_prune(W, H, mask_structure="2:4", damp=0, dtype=torch.float32)
    ref = exact_obs_prune(W, H, mask_structure="2:4", damp=0, dtype=torch.float64)
    assert r.info["refit_rows"] > 0
    assert r.loss == pytest.approx(ref.loss, rel=5e-2)
    # The weights are the least-squares optimum on the mask, from its definition per row:
    # w_S = w0_S + H_SS^-1 H_SP w0_P.
    best = torch.zeros(8, 48, dtype=torch.float64)
    for i in range(8):
        S, P = r.mask[i].nonzero().flatten(), (~r.mask[i]).nonzero().flatten()
        w0 = W[i].double()
        best[i, S] = w0[S] + torch.linalg.solve(H[S][:, S], H[S][:, P] @ w0[P])
    assert r.loss == pytest.approx(layer_loss(W, best, H), rel=1e-6)


def test_solving_on_several_threads_leaves_torchs_thread_count_alone(monkeypatch):
    # torch's thread count is process-wide: a solver that set it to 1 while it runs would slow
    # down everything else the process does meanwhile.
    import obcompress.solvers._elimination as E

    if E._native.kernel() is None:
        pytest.skip("chunks run on threads only with the fused kernel")
    seen = []
    real_start = E._start_chunk

    def spy(*a, **k):
        seen.append(torch.get_num_threads())
        return real_start(*a, **k)

    monkeypatch.setattr(E, "_start_chunk", spy)
    monkeypatch.setattr(E, "CHUNK_BYTES_NATIVE", 3 * COLS * COLS * 4)
    W, H = correlated_problem(12, COLS, seed=20, dtype=torch.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        exact_obs_database(W, H, damp=0)
    finally:
        torch.set_num_threads(threads)
    assert len(seen) > 1 and set(seen) == {2}
