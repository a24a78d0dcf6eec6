import copy

import pytest
import torch
import torch.nn.functional as F

from obcompress.search.fit_apply import apply_rtn_fit, finetune
from obcompress.search.fit_score import fit_masks, fit_perturbation
from obcompress.search.space import Variant

def test_apply_rtn_fit_and_finetune(trained, mean_loss):
    model, X, Y, data, fisher = trained
    m = copy.deepcopy(model)
    choice = {"a": Variant("unstructured", 0.5, 3), "b": Variant(bits=2), "c": Variant()}
    masks, grids = apply_rtn_fit(m, choice, fisher)
    assert set(masks) == {"a", "b"} and grids["a"].bits == 3 and grids["b"].bits == 2
    assert torch.equal(masks["a"], fit_masks(fisher, model, {"a": 0.5})["a"])
    assert int((m.a.weight == 0).sum()) >= 12 and torch.all(m.a.weight[~masks["a"]] == 0)
    for n in ("a", "b"):
        w = getattr(m, n).weight.detach()
        torch.testing.assert_close(grids[n].quantize(w.float()).double(), w)  # on its grid
    assert torch.equal(m.c.weight, model.c.weight)
    # The Fisher-weighted distance counts each pruned weight's square plus the rounding errors.
    d = fit_perturbation(fisher, model, m)
    assert d >= float((fisher.diag["a"].double() * model.a.weight.detach() ** 2)[~masks["a"]].sum())
    before = mean_loss(m, X, Y)
    m.c.eval()
    hist = finetune(m, data, F.cross_entropy, masks, grids, epochs=3, lr=2e-3)
    assert len(hist) == 3 and mean_loss(m, X, Y) < before
    assert torch.all(m.a.weight[~masks["a"]] == 0)
    for n in ("a", "b"):
        w = getattr(m, n).weight.detach()
        torch.testing.assert_close(grids[n].quantize(w.float()).double(), w)
    assert all(p.grad is None for p in m.parameters()) and m.training and not m.c.training


def test_bad_input(trained):
    model, X, Y, data, fisher = trained
    with pytest.raises(ValueError, match="epochs"):
        finetune(model, data, F.cross_entropy, {}, {}, epochs=-1)
