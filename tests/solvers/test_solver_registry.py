"""The conformance suite: every registered solver, in every mode and mask structure it declares,
keeps the promises of a SolverResult. A new solver gets these tests by registering."""

import math

import pytest
import torch

from obcompress.checks import parse_mask_structure
from obcompress.solvers import QuantGrid, _native, layer_loss, num_pruned
from obcompress.solvers.hessian import hessian
from obcompress.solvers.registry import SOLVERS, SolverSpec, describe, get_solver, register, solvers_that

ROWS, COLS, TAPS = 8, 16, 4  # a conv of 4 input channels x 4 taps where columns_last is used
STRUCTURES = {"unstructured": ("unstructured", 0.5), "nm": ("2:4", None), "block": ("block:4", 0.5)}


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _problem(dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(256, COLS, generator=g, dtype=torch.float64) @ (torch.eye(COLS, dtype=torch.float64)
                                                                    + 0.3 * torch.randn(COLS, COLS, generator=g,
                                                                                        dtype=torch.float64))
    W = torch.randn(ROWS, COLS, generator=g).to(dtype)
    return W.to(device), hessian(X).to(device)


GRIDS = {
    "channel4": lambda W: QuantGrid.fit(W, 4),
    "group3-asym": lambda W: QuantGrid.fit(W, 3, symmetric=False, strategy="group", group_size=8),
}


def _cases():
    """Every (solver, mode, structure, grid) it declares, in float32; the greedy solvers, which have
    two step engines (the fused C kernel and torch), on both; float64, and a GPU where there is one,
    once per solver and mode."""
    for name, spec in SOLVERS.items():
        engines = ("native", "torch") if name in ("exact", "best") else ("native",)
        for mode in sorted(spec.modes):
            kinds = spec.structures if mode in ("prune", "joint") else (None,)
            grids = GRIDS if mode in ("quantize", "joint") else (None,)
            first = True
            for kind in kinds:
                for grid in grids:
                    for columns_last in ((None, TAPS) if kind == "nm" else (None,)):
                        parts = [name, mode, STRUCTURES[kind][0] if kind else None, grid,
                                 f"cl{columns_last}" if columns_last else None]
                        variants = [(torch.float32, "cpu")]
                        if first:
                            variants += [(torch.float64, "cpu")] + [(torch.float32, d) for d in DEVICES[1:]]
                        first = False
                        for dtype, device in variants:
                            for engine in engines if device == "cpu" else ("torch",):
                                tag = [str(dtype)[6:], engine] + ([device] if device != "cpu" else [])
                                yield pytest.param(name, kind, grid, columns_last, dtype, engine, device,
                                                   id="-".join(p for p in parts + tag if p))


def _solve(name, W, H, kind, grid_kind, columns_last):
    ms, sparsity = STRUCTURES[kind] if kind else (None, None)
    grid = GRIDS[grid_kind](W) if grid_kind else None
    return get_solver(name).solve(W, H, grid=grid, mask_structure=ms, sparsity=sparsity, columns_last=columns_last)


def _in_solver_order(M, columns_last):
    """Columns as the structure sees them: a conv's (C, K) flattening reordered to (K, C)."""
    if columns_last is None:
        return M
    return M.reshape(M.shape[0], COLS // columns_last, columns_last).transpose(1, 2).reshape(M.shape[0], COLS)


@pytest.mark.parametrize("name,kind,grid_kind,columns_last,dtype,engine,device", list(_cases()))
def test_conformance(name, kind, grid_kind, columns_last, dtype, engine, device, monkeypatch):
    if engine == "torch":
        monkeypatch.setenv("OBCOMPRESS_NATIVE", "0")
    else:
        monkeypatch.delenv("OBCOMPRESS_NATIVE", raising=False)
    W, H = _problem(dtype, device=device)
    res = _solve(name, W, H, kind, grid_kind, columns_last)

    # reported loss = measured loss, against the H given
    assert math.isclose(res.loss, layer_loss(W, res.weight, H), rel_tol=1e-9, abs_tol=1e-12)
    # the engine that ran: the exact solvers' greedy loop on the fused kernel or in torch
    native = engine == "native" and device == "cpu" and _native.kernel() is not None and name in ("exact", "best")
    assert res.info["engine"] == ("native" if native else "torch") or res.method == "gptq-act"
    # dtype, shape and device of the input
    assert res.weight.dtype == W.dtype and res.weight.shape == W.shape and res.weight.device == W.device
    assert torch.isfinite(res.weight).all()

    if kind is not None:
        mask = res.mask
        assert mask is not None and mask.dtype == torch.bool and mask.shape == W.shape and mask.device == W.device
        assert (res.weight[~mask] == 0).all()
        ms, sparsity = STRUCTURES[kind]
        structure = parse_mask_structure(ms)
        m = _in_solver_order(mask, columns_last)
        if kind == "nm":
            kept = m.reshape(ROWS, COLS // structure.m, structure.m).sum(-1)
            assert (kept == structure.n).all()  # exactly N of every M, in the structure's column order
        elif kind == "block":
            blocks = m.reshape(ROWS, COLS // structure.block, structure.block)
            assert (blocks.all(-1) | ~blocks.any(-1)).all()  # whole blocks kept or pruned
            assert int((~blocks.any(-1)).sum()) == num_pruned(sparsity, blocks.shape[0] * blocks.shape[1])
        else:
            assert int((~mask).sum()) == num_pruned(sparsity, W.numel())
    else:
        assert res.mask is None or bool(res.mask.all())

    if grid_kind is not None:
        grid = res.grid
        assert isinstance(grid, QuantGrid)
        keep = res.mask if res.mask is not None else torch.ones_like(res.weight, dtype=torch.bool)
        w32 = res.weight.to(torch.float32)
        on_grid = grid.quantize(w32) == w32
        assert on_grid[keep].all()  # every kept weight is a point of the grid
        cols = grid.column_groups(COLS)
        for r in range(ROWS):
            for gi in cols.unique():
                sel = keep[r] & (cols == gi)
                assert w32[r, sel].unique().numel() <= 2 ** grid.bits  # at most 2^bits values per row and group

    # deterministic
    again = _solve(name, W, H, kind, grid_kind, columns_last)
    assert torch.equal(again.weight, res.weight) and again.loss == res.loss
    assert (again.mask is None) == (res.mask is None) and (res.mask is None or torch.equal(again.mask, res.mask))


def _bad_inputs(spec: SolverSpec):
    W, H = _problem()
    grid = QuantGrid.fit(W, 4)
    # a valid call: quantize alone where the solver can, else prune
    if "quantize" in spec.modes:
        ok = {"grid": grid, "mask_structure": None, "sparsity": None}
    else:
        ok = {"grid": None, "mask_structure": "unstructured", "sparsity": 0.5}
    bad_w = W.clone()
    bad_w[0, 0] = float("nan")
    yield "non-finite W", (bad_w, H), ok
    yield "H of another size", (W, H[:8, :8]), ok
    yield "W not 2-D", (W.reshape(-1), H), ok
    if spec.quantizes:
        yield "grid of another layer", (W, H), {**ok, "grid": QuantGrid.fit(W[:4], 4)}
        yield "not a grid", (W, H), {**ok, "grid": "int4"}
    if spec.prunes:
        yield "sparsity 1.5", (W, H), {**ok, "mask_structure": "unstructured", "sparsity": 1.5}
        yield "N:M with N >= M", (W, H), {**ok, "mask_structure": "4:2"}
        yield "columns not divisible", (W[:, :14], H[:14, :14]), {**ok, "mask_structure": "2:4", "sparsity": None}
        for k in ("unstructured", "nm", "block"):
            if k not in spec.structures:
                yield f"unsupported {k} mask", (W, H), {**ok, **dict(zip(("mask_structure", "sparsity"), STRUCTURES[k]))}
    else:
        yield "pruning by a solver that cannot", (W, H), {**ok, "mask_structure": "unstructured", "sparsity": 0.5}
    if not spec.act_order:
        yield "act_order", (W, H), {**ok, "act_order": True}
    yield "nothing to do", (W, H), {"grid": None, "mask_structure": None}
    if spec.needs_hessian:
        yield "no H", (W, None), ok


@pytest.mark.parametrize("name", list(SOLVERS))
def test_bad_input_is_one_value_error(name):
    spec = SOLVERS[name]
    for what, (W, H), kwargs in _bad_inputs(spec):
        with pytest.raises(ValueError) as e:
            spec.solve(W, H, **kwargs)
        assert str(e.value), what


def test_registry():
    assert list(SOLVERS) == ["exact", "best", "gptq", "sparsegpt", "magnitude", "rtn"]
    assert solvers_that("prune") == ["exact", "best", "sparsegpt", "magnitude"]
    assert solvers_that("quantize") == list(SOLVERS)
    assert solvers_that(act_order=True) == ["gptq"]
    assert [line.split()[0] for line in describe().splitlines()] == list(SOLVERS)
    with pytest.raises(ValueError, match="registered already"):
        register(SOLVERS["rtn"])
    with pytest.raises(ValueError, match="unknown solver 'obq'"):
        get_solver("obq")
    with pytest.raises(ValueError, match="structures"):
        register(SolverSpec("pruner", "no structures", SOLVERS["rtn"].run, False, frozenset({"prune"})))
    with pytest.raises(ValueError, match="does not support block masks"):
        SOLVERS["sparsegpt"].check(False, "block:4")
    with pytest.raises(ValueError, match="cannot prune"):
        SOLVERS["gptq"].check(True, "2:4")
