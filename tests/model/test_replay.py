import pytest
import torch
from torch import nn

from obcompress.model.replay import PrefixReplay, call_intervals
from obcompress.search.nonuniform import CalibrationLoss


class Pair(nn.Module):
    """A module whose output is a dict (as transformers' blocks return structures)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)

    def forward(self, x):
        return {"left": self.a(x), "right": self.b(x)}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.act = nn.ReLU(inplace=True)  # shared: called three times per pass
        self.stem = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
        self.pair = Pair()
        self.mid = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        s = self.stem(x)
        s.mul_(2.0)  # in place on the output of a module that is replayed
        h = self.act(s)
        p = self.pair(h)
        h = p["left"] + p["right"]
        r = self.mid(h)
        r += h
        return self.head(self.act(r)) + self.act(h).sum(-1, keepdim=True)


def batches():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(5, 4, generator=g) for _ in range(3)]


def test_call_intervals_nest_and_count_every_call():
    torch.manual_seed(0)
    net = Net()
    calls = call_intervals(net, lambda: net(batches()[0]))
    assert len(calls["act"]) == 3 and len(calls["stem"]) == 1
    (s, e), = calls["stem"]
    (s0, e0), = calls["stem.0"]
    assert s < s0 < e0 < e
    assert calls["pair"][0][1] < calls["mid"][0][0]


def test_replayed_passes_give_the_full_passes_outputs_for_every_layer_and_change():
    torch.manual_seed(0)
    net = Net().eval()
    data = batches()
    runs = [lambda b=b: net(b) for b in data]
    for layer in ("stem.0", "pair.a", "pair.b", "mid", "head"):
        replay = PrefixReplay(net, layer, runs)
        mod = dict(net.named_modules())[layer]
        before = mod.weight.detach().clone()
        with torch.no_grad():
            mod.weight.mul_(-0.7).add_(0.1)
        try:
            for i, b in enumerate(data):
                with torch.no_grad():
                    full = net(b)
                    with replay.active(i):
                        replayed = net(b)
                assert torch.equal(full, replayed), layer
                # and repeatably: the in-place `s.mul_` did not change what is replayed
                with torch.no_grad(), replay.active(i):
                    assert torch.equal(net(b), full)
        finally:
            with torch.no_grad():
                mod.weight.copy_(before)


def test_the_modules_before_the_layer_do_not_run_and_are_put_back():
    torch.manual_seed(0)
    net = Net().eval()
    data = batches()
    replay = PrefixReplay(net, "mid", [lambda b=b: net(b) for b in data])
    # the largest modules over before `mid` starts; the shared activation is called after it too
    assert set(replay.skipped) == {"stem", "pair"}
    ran = []
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: ran.append(n)) for n, m in net.named_modules() if n]
    try:
        with torch.no_grad(), replay.active(1):
            net(data[1])
        assert "stem.0" not in ran and "pair.a" not in ran and "mid" in ran and "head" in ran
        ran.clear()
        with torch.no_grad():
            net(data[1])
        assert "stem.0" in ran and "pair.a" in ran
    finally:
        for h in hooks:
            h.remove()
    assert "forward" not in net.stem.__dict__ and "forward" not in net.pair.__dict__


class Counting(nn.Module):
    """State that a skipped call would not advance: replaying it would be wrong."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x + self.calls


def test_a_replay_that_does_not_reproduce_the_dense_outputs_is_refused():
    torch.manual_seed(0)
    net = nn.Sequential(Counting(), nn.Linear(4, 3)).eval()
    loss = CalibrationLoss(net, batches(), kind="mse")
    assert loss.replay("1") is None
    plain = nn.Sequential(nn.Tanh(), nn.Linear(4, 3)).eval()
    loss = CalibrationLoss(plain, batches(), kind="mse")
    replay = loss.replay("1")
    assert replay is not None and replay.skipped == ["0"]
    assert loss(replay) == 0.0
    with pytest.raises(KeyError, match="nope"):
        loss.replay("nope")
