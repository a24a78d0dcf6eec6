import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from obcompress.model.corrections import (
    norm_statistics,
    reestimate_batchnorm,
    statistics_correction,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


class CNN(nn.Module):
    """conv-BN-ReLU twice, then a head; Dropout shows which passes run in eval mode."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6, momentum=0.3)
        self.head = nn.Linear(6, 4)
        self.head_calls = 0
        with torch.no_grad():  # stale statistics and a non-trivial affine, as after training elsewhere
            for bn in (self.bn1, self.bn2):
                bn.running_mean.uniform_(-1, 1)
                bn.running_var.uniform_(0.5, 2)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.5, 0.5)
                bn.num_batches_tracked.fill_(100)

    def forward(self, x):
        h = self.drop(torch.relu(self.bn1(self.conv1(x))))
        h = torch.relu(self.bn2(self.conv2(h)))
        self.head_calls += 1
        return self.head(h.mean((2, 3)))


def _batches(sizes=(7, 5, 4), seed=1):
    g = _gen(seed)
    return [torch.randn(n, 3, 6, 6, generator=g) * 1.5 + 0.3 for n in sizes]


def _stats(t, dims):
    return t.mean(dims), t.var(dims, unbiased=True)


def test_bn_reestimation_gives_the_exact_statistics_of_the_calibration_inputs():
    model = CNN().train()
    batches = _batches()
    momenta = (model.bn1.momentum, model.bn2.momentum)
    done = reestimate_batchnorm(model, batches)
    assert done == ["bn1", "bn2"]

    # By hand: bn1 sees conv1 of all samples; bn2 sees conv2 of the batch-normalized, dropout-free
    # (eval-mode) bn1 output, one calibration batch at a time.
    ref = CNN()
    with torch.no_grad():
        a1 = torch.cat([ref.conv1(b) for b in batches])
        a2 = torch.cat([
            ref.conv2(torch.relu(F.batch_norm(ref.conv1(b), None, None, ref.bn1.weight, ref.bn1.bias,
                                              training=True, eps=ref.bn1.eps)))
            for b in batches
        ])
    for bn, a in ((model.bn1, a1), (model.bn2, a2)):
        mean, var = _stats(a.double(), (0, 2, 3))
        assert torch.allclose(bn.running_mean.double(), mean, atol=1e-5, rtol=1e-5)
        assert torch.allclose(bn.running_var.double(), var, atol=1e-5, rtol=1e-5)
        assert int(bn.num_batches_tracked) == len(batches)
    assert (model.bn1.momentum, model.bn2.momentum) == momenta
    assert all(m.training for m in model.modules())
    # The batches differ in size, so a plain average of per-batch means would not match.
    per_batch = torch.stack([ref.conv1(b).mean((0, 2, 3)) for b in batches]).mean(0).detach()
    assert not torch.allclose(per_batch, model.bn1.running_mean, atol=1e-4)


def test_bn_reestimation_keeps_eval_mode_and_unused_layers():
    model = CNN()
    model.spare = nn.BatchNorm2d(8)  # never called by forward
    model.eval()
    with torch.no_grad():
        model.spare.running_mean.fill_(3.0)
    assert reestimate_batchnorm(model, _batches()) == ["bn1", "bn2"]
    assert not any(m.training for m in model.modules())
    assert torch.all(model.spare.running_mean == 3.0) and int(model.spare.num_batches_tracked) == 0
    # In eval mode the re-estimated model now normalizes the calibration data: bn1's output per
    # channel has mean bias and std |weight| (up to eps and the unbiased variance).
    out = []
    h = model.bn1.register_forward_hook(lambda m, a, o: out.append(o.detach()))
    with torch.no_grad():
        for b in _batches():
            model(b)
    h.remove()
    y = torch.cat(out)
    assert torch.allclose(y.mean((0, 2, 3)), model.bn1.bias.detach(), atol=1e-5)
    assert torch.allclose(y.std((0, 2, 3)), model.bn1.weight.detach().abs(), rtol=1e-3)


def test_bn_reestimation_errors_leave_the_statistics_alone():
    model = CNN().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.conv2.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="layer bn2: non-finite"):
        reestimate_batchnorm(model, _batches())
    for k in ("bn1.running_mean", "bn1.running_var", "bn2.running_mean", "bn1.num_batches_tracked"):
        assert torch.equal(model.state_dict()[k], before[k])
    assert all(m.training for m in model.modules())
    with pytest.raises(ValueError, match="no BatchNorm"):
        reestimate_batchnorm(nn.Sequential(nn.Linear(3, 3)), [torch.randn(2, 3)])
    with pytest.raises(ValueError, match="layer bn1: .*more than one value per channel"):
        reestimate_batchnorm(CNN(), [torch.randn(1, 3, 1, 1)])


def _perturbed(dense, scale=0.35, seed=5):
    comp = copy.deepcopy(dense)
    g = _gen(seed)
    with torch.no_grad():
        for conv in (comp.conv1, comp.conv2):
            w = conv.weight
            w.mul_(0.8).add_(torch.randn(w.shape, generator=g) * scale * w.std())
        comp.conv1.bias.add_(0.3)
    return comp


def _norm_outputs(model, batches, names):
    out = {n: [] for n in names}
    mods = dict(model.named_modules())
    hs = [mods[n].register_forward_hook(lambda m, a, o, n=n: out[n].append(o.detach())) for n in names]
    was = model.training
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(b) for b in batches])
    model.train(was)
    for h in hs:
        h.remove()
    return {n: torch.cat(v) for n, v in out.items()}, logits


def test_statistics_correction_matches_dense_bn_output_statistics_and_improves_the_output():
    dense = CNN().eval()
    comp = _perturbed(dense).train()
    batches = _batches()
    dense_y, dense_logits = _norm_outputs(dense, batches, ["bn1", "bn2"])
    before_y, before_logits = _norm_outputs(comp, batches, ["bn1", "bn2"])

    report = statistics_correction(comp, dense, batches)

    assert all(m.training for m in comp.modules()) and not any(m.training for m in dense.modules())
    after_y, after_logits = _norm_outputs(comp, batches, ["bn1", "bn2"])
    for n in ("bn1", "bn2"):
        d, b, a = dense_y[n], before_y[n], after_y[n]
        assert not torch.allclose(b.mean((0, 2, 3)), d.mean((0, 2, 3)), atol=1e-2)
        assert torch.allclose(a.mean((0, 2, 3)), d.mean((0, 2, 3)), atol=1e-4)
        assert torch.allclose(a.std((0, 2, 3)), d.std((0, 2, 3)), atol=1e-4)
        shift_before, shift_after = report[n]
        assert shift_before > 1e-2 and shift_after < 1e-4
    # bn1 comes first, so its "before" is the uncorrected model's (bn2's is after bn1's correction).
    measured = (before_y["bn1"].mean((0, 2, 3)) - dense_y["bn1"].mean((0, 2, 3))).abs().max()
    assert report["bn1"][0] == pytest.approx(float(measured), rel=1e-4)
    assert list(report) == ["bn1", "bn2"]
    assert F.mse_loss(after_logits, dense_logits) < F.mse_loss(before_logits, dense_logits)


def test_statistics_correction_from_precomputed_dense_statistics_and_early_stopping():
    dense = CNN().eval()
    batches = _batches()
    stats = norm_statistics(dense, batches)  # taken before compressing "in place"
    assert stats.order == ["bn1", "bn2"] and stats.calls == [{"bn1": 1, "bn2": 1}] * 3
    comp_a, comp_b = _perturbed(dense), _perturbed(dense)
    statistics_correction(comp_a, dense, batches)
    comp_b.head_calls = 0
    statistics_correction(comp_b, stats, batches)
    for pa, pb in zip(comp_a.parameters(), comp_b.parameters()):
        assert torch.equal(pa, pb)
    # Each pass stops after the layers it measures: the head (after the last norm) never runs.
    assert comp_b.head_calls == 0


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.fc1 = nn.Linear(5, 12)
        self.ln = nn.LayerNorm(12)
        self.fc2 = nn.Linear(12, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.ln(self.fc1(x))))


def test_statistics_correction_of_layernorm_matches_per_feature_statistics():
    dense = Tokens()
    with torch.no_grad():
        dense.ln.weight.uniform_(0.5, 1.5)
    comp = copy.deepcopy(dense)
    with torch.no_grad():
        comp.fc1.weight.add_(torch.randn(comp.fc1.weight.shape, generator=_gen(2)) * 0.3)
    g = _gen(4)
    batches = [torch.randn(4, 7, 5, generator=g) for _ in range(3)]
    report = statistics_correction(comp, dense, batches)
    d, _ = _norm_outputs(dense, batches, ["ln"])
    a, _ = _norm_outputs(comp, batches, ["ln"])
    d, a = d["ln"].reshape(-1, 12), a["ln"].reshape(-1, 12)
    assert torch.allclose(a.mean(0), d.mean(0), atol=1e-4)
    assert torch.allclose(a.std(0), d.std(0), atol=1e-4)
    assert report["ln"][0] > 1e-2 and report["ln"][1] < 1e-4


def test_statistics_correction_refuses_mismatched_models_and_non_finite_outputs():
    dense = CNN()
    other = CNN()
    other.bn2 = nn.BatchNorm2d(6)
    other.conv2 = nn.Conv2d(8, 6, 3, padding=1)
    other.bn1 = nn.BatchNorm2d(8, affine=False)
    with pytest.raises(ValueError, match="layer bn1: the dense model has this normalization layer"):
        statistics_correction(other, dense, _batches())
    comp = _perturbed(dense)
    with torch.no_grad():
        comp.conv2.weight[0, 0, 0, 0] = float("inf")
    before = copy.deepcopy(comp.state_dict())
    with pytest.raises(ValueError, match="layer bn2: non-finite"):
        statistics_correction(comp, dense, _batches())
    # bn1 had been corrected when bn2's outputs overflowed: it is put back.
    assert all(torch.equal(v, comp.state_dict()[k]) for k, v in before.items())
    assert all(m.training for m in comp.modules())
    with pytest.raises(ValueError, match="same calibration batches"):
        statistics_correction(_perturbed(dense), norm_statistics(dense, _batches()), _batches(sizes=(4, 4)))


def test_statistics_correction_in_one_pass_equals_one_pass_per_layer():
    dense = CNN().eval()
    batches = _batches()
    comp_a, comp_b = _perturbed(dense), _perturbed(dense)
    rep_a = statistics_correction(comp_a, dense, batches, one_pass=True)
    rep_b = statistics_correction(comp_b, dense, batches, one_pass=False)
    assert list(rep_a) == list(rep_b)
    for n in rep_a:
        assert rep_a[n][0] == pytest.approx(rep_b[n][0], rel=1e-4, abs=1e-6)
        assert rep_a[n][1] < 1e-4 and rep_b[n][1] < 1e-4
    for (na, pa), (nb, pb) in zip(comp_a.named_parameters(), comp_b.named_parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5, msg=na)
    with pytest.raises(ValueError, match="one_pass"):
        statistics_correction(_perturbed(dense), dense, [{"x": b} for b in batches], one_pass=True)
