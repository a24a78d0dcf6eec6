import math

import pytest
import torch
import torch.nn.functional as F

from obcompress.solvers.hessian import HessianAccumulator, dampen, hessian, unfold_conv_input


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- hessian / accumulator (linear)


def test_hessian_matches_definition_in_float64():
    X = torch.randn(50, 7, generator=_gen())
    H = hessian(X)
    X64 = X.double()
    assert H.dtype == torch.float64 and H.shape == (7, 7)
    torch.testing.assert_close(H, 2 * X64.t() @ X64 / 50, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(H, H.t(), rtol=0, atol=0)


def test_hessian_3d_flattens_leading_dims():
    X = torch.randn(3, 11, 5, generator=_gen(1))
    torch.testing.assert_close(hessian(X), hessian(X.reshape(33, 5)), rtol=1e-12, atol=1e-12)
    X64 = X.reshape(33, 5).double()
    torch.testing.assert_close(hessian(X), 2 * X64.t() @ X64 / 33, rtol=1e-12, atol=1e-12)


def test_hessian_is_float64_accurate_for_low_precision_input():
    X = torch.randn(40, 6, generator=_gen(2)).to(torch.bfloat16)
    X64 = X.double()
    torch.testing.assert_close(hessian(X), 2 * X64.t() @ X64 / 40, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad", [torch.zeros(0, 4), torch.zeros(2, 0, 4), torch.zeros(3, 0)])
def test_hessian_empty_raises(bad):
    with pytest.raises(ValueError, match="empty calibration data"):
        hessian(bad)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_hessian_non_finite_raises(value):
    X = torch.randn(10, 3)
    X[4, 1] = value
    with pytest.raises(ValueError, match="non-finite"):
        hessian(X)


@pytest.mark.parametrize("bad", [torch.randn(5), torch.randn(2, 3, 4, 5), torch.ones(4, 3, dtype=torch.int64), [[1.0]]])
def test_hessian_bad_shape_or_type_raises(bad):
    with pytest.raises(ValueError):
        hessian(bad)


def test_accumulator_over_batches_equals_one_shot():
    g = _gen(3)
    batches = [torch.randn(n, 9, generator=g) * s for n, s in [(7, 1.0), (1, 3.0), (30, 0.5), (12, 2.0)]]
    acc = HessianAccumulator(9)
    for b in batches:
        acc.add(b)
    assert acc.nsamples == 50
    torch.testing.assert_close(acc.hessian(), hessian(torch.cat(batches)), rtol=1e-12, atol=1e-12)


def test_accumulator_accepts_3d_and_mixed_batches():
    g = _gen(4)
    a, b = torch.randn(2, 5, 4, generator=g), torch.randn(6, 4, generator=g)
    acc = HessianAccumulator(4)
    acc.add(a)
    acc.add(b)
    assert acc.nsamples == 16
    torch.testing.assert_close(acc.hessian(), hessian(torch.cat([a.reshape(-1, 4), b])), rtol=1e-12, atol=1e-12)


def test_accumulator_running_mean_stays_bounded():
    # Many batches of constant inputs: the running mean must stay exactly 2 x x^T, not grow.
    acc = HessianAccumulator(2)
    x = torch.tensor([[1.0, -2.0]])
    for _ in range(500):
        acc.add(x.expand(64, 2))
    torch.testing.assert_close(acc.hessian(), 2 * x.double().t() @ x.double(), rtol=1e-12, atol=1e-12)
    assert acc.nsamples == 500 * 64


def test_accumulator_hessian_is_a_copy():
    acc = HessianAccumulator(3)
    acc.add(torch.randn(4, 3))
    H = acc.hessian()
    H.zero_()
    assert acc.hessian().abs().sum() > 0


def test_accumulator_grouped_add():
    g = _gen(5)
    X1, X2 = torch.randn(3, 8, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    acc = HessianAccumulator(4, groups=3)
    acc.add(X1)
    acc.add(X2)
    H = acc.hessian()
    assert H.shape == (3, 4, 4) and acc.nsamples == 13
    for i in range(3):
        torch.testing.assert_close(H[i], hessian(torch.cat([X1[i], X2[i]])), rtol=1e-12, atol=1e-12)


def test_accumulator_errors():
    acc = HessianAccumulator(4)
    with pytest.raises(ValueError, match="no calibration samples"):
        acc.hessian()
    with pytest.raises(ValueError, match="columns"):
        acc.add(torch.randn(5, 3))
    with pytest.raises(ValueError, match="2-D"):
        acc.add(torch.randn(5))
    with pytest.raises(ValueError, match="2-D"):
        acc.add(torch.randn(2, 2, 2, 4))
    X = torch.randn(5, 4)
    X[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        acc.add(X)
    # A rejected batch leaves the accumulator untouched.
    assert acc.nsamples == 0
    good = torch.randn(6, 4)
    acc.add(good)
    X[0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        acc.add(X)
    torch.testing.assert_close(acc.hessian(), hessian(good), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError):
        acc.add(torch.ones(3, 4, dtype=torch.int32))

    grouped = HessianAccumulator(4, groups=2)
    with pytest.raises(ValueError, match="groups"):
        grouped.add(torch.randn(5, 4))
    with pytest.raises(ValueError, match="groups"):
        grouped.add(torch.randn(3, 5, 4))
    with pytest.raises(ValueError, match="columns"):
        grouped.add(torch.randn(2, 5, 3))

    for args in [(0,), (-1,), (2.5,), (4, 0)]:
        with pytest.raises(ValueError):
            HessianAccumulator(*args)


def test_dampen():
    H = hessian(torch.randn(20, 5, generator=_gen(6)))
    Hd = dampen(H, 0.01)
    lam = 0.01 * torch.diagonal(H).mean()
    torch.testing.assert_close(Hd, H + lam * torch.eye(5, dtype=H.dtype), rtol=1e-14, atol=1e-14)
    assert Hd.data_ptr() != H.data_ptr()
    torch.testing.assert_close(dampen(H, 0.0), H, rtol=0, atol=0)
    # Batched (one H per conv group): each dampened by its own mean diagonal.
    Hs = torch.stack([H, 3 * H])
    Hsd = dampen(Hs, 0.1)
    torch.testing.assert_close(Hsd[1], dampen(3 * H, 0.1), rtol=1e-14, atol=1e-14)
    for bad in [-0.1, float("nan"), float("inf"), "x", True]:
        with pytest.raises(ValueError):
            dampen(H, bad)
    with pytest.raises(ValueError, match="square"):
        dampen(torch.ones(3, 4), 0.1)


# ---------------------------------------------------------------- conv unfolding


def _conv_outputs_per_group(y, groups):
    """conv output (B, O, *spatial) -> (groups, B * positions, O / groups)."""
    B, O = y.shape[:2]
    return y.reshape(B, groups, O // groups, -1).permute(1, 0, 3, 2).reshape(groups, -1, O // groups)


CONV2D_CASES = [
    # C, O, groups, kernel, stride, padding, dilation, padding_mode
    (3, 5, 1, 3, 1, 0, 1, "zeros"),
    (4, 6, 1, (3, 2), (2, 1), (1, 2), (2, 1), "zeros"),
    (6, 4, 2, 3, 2, 1, 1, "zeros"),
    (6, 9, 3, (1, 3), 1, (0, 1), 2, "zeros"),
    (5, 5, 5, 3, 1, 1, 1, "zeros"),  # depthwise
    (4, 8, 4, 3, 2, 2, 2, "zeros"),  # depthwise with channel multiplier
    (4, 4, 1, 4, 1, "same", 1, "zeros"),  # even kernel: asymmetric 'same' padding
    (4, 4, 2, 3, 1, "same", 2, "zeros"),
    (3, 2, 1, 3, 1, "valid", 1, "zeros"),
    (3, 4, 1, 3, 1, 1, 1, "reflect"),
    (4, 4, 4, 3, 2, 1, 1, "circular"),
]


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("C,O,groups,k,s,p,d,mode", CONV2D_CASES)
def test_unfold_reproduces_conv2d(C, O, groups, k, s, p, d, mode):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(C, O, k, stride=s, padding=p, dilation=d, groups=groups, bias=False, padding_mode=mode)
    conv = conv.double().requires_grad_(False)
    x = torch.randn(2, C, 9, 8, dtype=torch.float64)
    U = unfold_conv_input(x, conv.kernel_size, conv.stride, p, conv.dilation, groups, padding_mode=mode)
    cols = C // groups * conv.kernel_size[0] * conv.kernel_size[1]
    y = conv(x)
    assert U.shape == (groups, 2 * y.shape[2] * y.shape[3], cols)
    Wg = conv.weight.reshape(groups, O // groups, -1)  # each group's weight.flatten(1)
    torch.testing.assert_close(torch.bmm(U, Wg.transpose(1, 2)), _conv_outputs_per_group(y, groups))


CONV1D_CASES = [
    (3, 4, 1, 3, 1, 0, 1, "zeros"),
    (4, 6, 2, 5, 2, 2, 1, "zeros"),
    (4, 4, 4, 3, 1, 2, 2, "zeros"),  # depthwise
    (2, 3, 1, 4, 1, "same", 1, "zeros"),
    (3, 3, 1, 3, 2, 1, 1, "replicate"),
]


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("C,O,groups,k,s,p,d,mode", CONV1D_CASES)
def test_unfold_reproduces_conv1d(C, O, groups, k, s, p, d, mode):
    torch.manual_seed(1)
    conv = torch.nn.Conv1d(C, O, k, stride=s, padding=p, dilation=d, groups=groups, bias=False, padding_mode=mode)
    conv = conv.double().requires_grad_(False)
    x = torch.randn(3, C, 13, dtype=torch.float64)
    U = unfold_conv_input(x, k, s, p, d, groups, padding_mode=mode)
    y = conv(x)
    assert U.shape == (groups, 3 * y.shape[2], C // groups * k)
    Wg = conv.weight.reshape(groups, O // groups, -1)
    torch.testing.assert_close(torch.bmm(U, Wg.transpose(1, 2)), _conv_outputs_per_group(y, groups))


def test_conv_hessian_gives_layer_loss():
    # The point of the unfolding: with H from the accumulator, 1/2 tr(D H D^T) is the mean squared
    # conv-output error per position, for any weight perturbation D of each group.
    torch.manual_seed(2)
    C, O, groups = 4, 6, 2
    conv = torch.nn.Conv2d(C, O, 3, stride=2, padding=1, groups=groups, bias=False).double().requires_grad_(False)
    x = torch.randn(3, C, 10, 10, dtype=torch.float64)
    acc = HessianAccumulator(C // groups * 9, groups=groups)
    acc.add_conv_input(x[:1], 3, stride=2, padding=1, groups=groups)
    acc.add_conv_input(x[1:], 3, stride=2, padding=1, groups=groups)
    H = acc.hessian()
    y = conv(x)
    npos = 3 * y.shape[2] * y.shape[3]
    assert acc.nsamples == npos
    W_hat = conv.weight + 0.1 * torch.randn_like(conv.weight)
    dy = F.conv2d(x, conv.weight - W_hat, stride=2, padding=1, groups=groups)
    err = _conv_outputs_per_group(dy, groups)  # (groups, npos, O/groups)
    D = (conv.weight - W_hat).reshape(groups, O // groups, -1)
    for g in range(groups):
        loss = 0.5 * float(((D[g] @ H[g]) * D[g]).sum())
        assert math.isclose(loss, float(err[g].pow(2).sum()) / npos, rel_tol=1e-10)


@pytest.mark.parametrize("groups", [1, 2, 6])
def test_accumulator_conv_equals_one_shot_of_unfolded(groups):
    g = _gen(7)
    C = 6
    x1, x2 = torch.randn(2, C, 7, 7, generator=g), torch.randn(1, C, 7, 7, generator=g)
    k = (3, 2)
    acc = HessianAccumulator(C // groups * 6, groups=groups)
    acc.add_conv_input(x1, k, stride=1, padding=1, dilation=1, groups=groups)
    acc.add_conv_input(x2, k, stride=1, padding=1, dilation=1, groups=groups)
    U = unfold_conv_input(torch.cat([x1, x2]), k, 1, 1, 1, groups)
    H = acc.hessian()
    H = H.unsqueeze(0) if groups == 1 else H
    assert acc.nsamples == U.shape[1]
    for i in range(groups):
        torch.testing.assert_close(H[i], hessian(U[i]), rtol=1e-12, atol=1e-12)


def test_accumulator_conv1d_depthwise():
    x = torch.randn(2, 5, 11, generator=_gen(8))
    acc = HessianAccumulator(3, groups=5)
    acc.add_conv_input(x, 3, padding=1, groups=5)
    H = acc.hessian()
    assert H.shape == (5, 3, 3) and acc.nsamples == 22
    U = unfold_conv_input(x, 3, padding=1, groups=5)
    torch.testing.assert_close(H[2], hessian(U[2]), rtol=1e-12, atol=1e-12)


def test_accumulator_conv_paths_agree():
    # Inputs are unfolded one image at a time, and pointwise convs take a path without unfolding;
    # neither may change H: both equal the one-shot H of the whole unfolded batch.
    x = torch.randn(5, 3, 6, 6, generator=_gen(9))
    for kw, cols in ((dict(kernel_size=3, padding=1), 27), (dict(kernel_size=1), 3),
                     (dict(kernel_size=1, stride=2), 3), (dict(kernel_size=3, groups=3), 9)):
        acc = HessianAccumulator(cols, kw.get("groups", 1))
        acc.add_conv_input(x[:2], **kw)
        acc.add_conv_input(x[2:], **kw)
        U = unfold_conv_input(x, **kw)
        ref = torch.stack([hessian(U[g]) for g in range(U.shape[0])])
        H = acc.hessian()
        torch.testing.assert_close(H if H.dim() == 3 else H[None], ref, rtol=1e-12, atol=1e-12)


def test_conv_errors():
    x = torch.randn(2, 4, 6, 6)
    bad_calls = [
        dict(x=torch.randn(2, 4, 6, 6, 6), kernel_size=3),  # conv3d input
        dict(x=torch.randn(4, 6), kernel_size=3),
        dict(x=torch.randn(0, 4, 6, 6), kernel_size=3),
        dict(x=x, kernel_size=0),
        dict(x=x, kernel_size=(3, 3, 3)),
        dict(x=x, kernel_size=3, stride=0),
        dict(x=x, kernel_size=3, padding=-1),
        dict(x=x, kernel_size=3, dilation=0),
        dict(x=x, kernel_size=3, groups=3),  # 4 channels not divisible by 3
        dict(x=x, kernel_size=3, groups=0),
        dict(x=x, kernel_size=7),  # kernel larger than the padded input
        dict(x=x, kernel_size=3, dilation=3),
        dict(x=x, kernel_size=3, padding="same", stride=2),
        dict(x=x, kernel_size=3, padding="full"),
        dict(x=x, kernel_size=3, padding_mode="mirror"),
        dict(x=x.to(torch.int32), kernel_size=3),
    ]
    for kw in bad_calls:
        with pytest.raises(ValueError):
            unfold_conv_input(**kw)

    acc = HessianAccumulator(36)
    with pytest.raises(ValueError, match="columns"):
        acc.add_conv_input(x, 2)
    with pytest.raises(ValueError, match="groups"):
        acc.add_conv_input(x, 3, groups=2)
    xb = x.clone()
    xb[1, 2, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        acc.add_conv_input(xb, 3)
    assert acc.nsamples == 0
    depthwise = HessianAccumulator(9, groups=4)
    with pytest.raises(ValueError, match="columns"):
        depthwise.add_conv_input(torch.randn(2, 8, 6, 6), 3, groups=4)
