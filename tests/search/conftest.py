import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from obcompress.search.fisher import empirical_fisher


@pytest.fixture
def mean_loss():
    """The mean cross-entropy of a model on (X, Y), without gradients."""

    def loss(model, X, Y):
        with torch.no_grad():
            return float(F.cross_entropy(model(X), Y))

    return loss


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one thread (tests/conftest.py)."""


class Branches(nn.Module):
    """Multinomial logistic regression whose logits are the sum of three linear layers on three
    slices of the input: convex, so it trains to its minimum in a few L-BFGS steps, and, fitted to
    labels drawn from a model of the same form, the empirical Fisher there approximates the Hessian."""

    SPLIT = (6, 8, 10)

    def __init__(self):
        super().__init__()
        a, b, c = self.SPLIT
        self.a = nn.Linear(a, 4)
        self.b = nn.Linear(b, 4, bias=False)
        self.c = nn.Linear(c, 4, bias=False)

    def forward(self, x):
        a, b, _ = self.SPLIT
        return self.a(x[:, :a]) + self.b(x[:, a:a + b]) + self.c(x[:, a + b:])



@pytest.fixture(scope="session")
def trained():
    torch.manual_seed(0)
    teacher = Branches().double()
    with torch.no_grad():
        for p in teacher.parameters():
            p.mul_(3)
    X = torch.randn(3000, sum(Branches.SPLIT), dtype=torch.float64)
    with torch.no_grad():
        Y = torch.multinomial(F.softmax(teacher(X), -1), 1).squeeze(1)
    model = copy.deepcopy(teacher)
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=60, tolerance_grad=1e-10, tolerance_change=0,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(X), Y)
        loss.backward()
        return loss

    opt.step(closure)
    for p in model.parameters():
        p.grad = None
    g = torch.autograd.grad(F.cross_entropy(model(X), Y), list(model.parameters()))
    assert max(float(t.abs().max()) for t in g) < 1e-6  # at the minimum: the quadratic regime holds there
    data = [(X[i:i + 200], Y[i:i + 200]) for i in range(0, len(X), 200)]
    fisher = empirical_fisher(model, data, F.cross_entropy, min_batches=len(data), max_batches=len(data), tol=1e-9,
                              mode="per_sample")
    return model, X, Y, data, fisher

