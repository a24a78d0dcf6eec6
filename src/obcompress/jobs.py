"""One layer's compression as an executor job, and what an exact solve will cost before it starts.

``solve_layer_groups(name, Wg, Hg, scheme, columns_last, device)`` is the job ``compress`` hands to
the executor for each layer: pure tensors in (the weight per group, its Hessian per group, the
layer's settings), a ``LayerSolution`` out, all on the CPU so that it travels back from a Ray worker
or a GPU. The model is written by the caller alone.

The exact greedy solvers cost about rows x cols^3 / 3 multiply-adds per pass (DESIGN.md section 6):
``exact_rate()`` times one small ExactOBS pass here, once per process, and ``estimate_seconds``
scales it to a layer's shape; ``compress`` announces layers that will take long and shows their
progress with an ETA.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch

from .recipe import LayerScheme
from .solvers import QuantGrid, SolverResult
from .solvers.registry import get_solver

__all__ = ["LayerSolution", "estimate_seconds", "exact_passes", "exact_rate", "solve_layer", "solve_layer_groups",
           "LONG_SOLVE_SECONDS"]

# A layer whose exact solve is expected to take longer than this is announced (with the
# alternatives) and shows rows done and an ETA while it runs.
LONG_SOLVE_SECONDS = 30.0


@dataclass
class LayerSolution:
    """The compressed weight of every group of one layer and what the report and artifact need."""

    weight: torch.Tensor  # (groups, rows, cols) float32, CPU
    grids: List[Optional[QuantGrid]]  # per group, None where not quantized
    masks: List[Optional[torch.Tensor]]  # per group, True = kept; None where not pruned
    loss: Optional[float]  # summed over groups; None when the layer had no Hessian
    kept: int
    damp: float
    method: str
    seconds: float
    info: dict = field(default_factory=dict)


def _cpu(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.detach().to("cpu")


def _grid(W: torch.Tensor, scheme: LayerScheme) -> Optional[QuantGrid]:
    q = scheme.quantization
    return None if q is None else QuantGrid.fit(W, **q.grid_kwargs())


def solve_layer(W: torch.Tensor, H: torch.Tensor, scheme: LayerScheme, columns_last: Optional[int]) -> SolverResult:
    """Compress one (group of a) layer's weight as ``scheme`` says, with the registered solver it
    names (solvers.registry); the result's loss is measured.

    The grid is always fitted on the dense weight: a least-squares re-fit on a sparse support
    stretches a row's range, and a grid fitted on the stretched row is coarser.
    """
    q, sp = scheme.quantization, scheme.sparsity
    return get_solver(scheme.solver).solve(
        W, H, grid=_grid(W, scheme), mask_structure=None if sp is None else sp.mask_structure,
        sparsity=None if sp is None else sp.sparsity, columns_last=columns_last, damp=scheme.damp,
        act_order=q is not None and q.act_order)


def solve_layer_groups(name: str, Wg: torch.Tensor, Hg: Optional[torch.Tensor], scheme: LayerScheme,
                       columns_last: Optional[int], device: Optional[str] = None) -> LayerSolution:
    """Solve every group of one layer as ``scheme`` says, on ``device`` (None: where Wg is).

    ``Wg`` (groups, rows, cols); ``Hg`` (groups, cols, cols), or None for magnitude / RTN without a
    loss to report. Errors are ``ValueError("layer <name>[ (group g)]: ...")``.
    """
    t0 = time.perf_counter()
    if device is not None:
        Wg = Wg.to(device)
        Hg = None if Hg is None else Hg.to(device)
    out = torch.empty(Wg.shape, dtype=torch.float32)
    loss: Optional[float] = 0.0
    kept, damp, method, engines = 0, 0.0, scheme.solver, set()
    grids: List[Optional[QuantGrid]] = []
    masks: List[Optional[torch.Tensor]] = []
    for g in range(Wg.shape[0]):
        try:
            res = solve_layer(Wg[g], None if Hg is None else Hg[g], scheme, columns_last)
        except ValueError as e:
            where = f"layer {name}" + (f" (group {g})" if Wg.shape[0] > 1 else "")
            raise ValueError(f"{where}: {e}") from None
        out[g] = res.weight.detach().to("cpu", torch.float32)
        grid = res.grid if scheme.quantization is not None else None
        grids.append(None if grid is None else grid.to("cpu"))
        masks.append(_cpu(res.mask))
        if loss is not None:
            loss = None if (Hg is None or not math.isfinite(res.loss)) else loss + float(res.loss)
        kept += int(res.mask.sum()) if res.mask is not None else Wg[g].numel()
        damp = max(damp, float(res.damp))
        method = res.method or method
        engines.add(res.info.get("engine", "torch"))
    return LayerSolution(weight=out, grids=grids, masks=masks, loss=loss, kept=kept, damp=damp, method=method,
                         seconds=time.perf_counter() - t0, info={"engine": "+".join(sorted(engines))})


def exact_passes(scheme: LayerScheme) -> int:
    """Exact greedy passes a layer's scheme runs per group: ExactOBS for pruning, OBQ for quantization."""
    if scheme.solver not in ("exact", "best"):
        return 0
    return int(scheme.sparsity is not None) + int(scheme.quantization is not None)


_RATE: List[float] = []


def exact_rate() -> float:
    """Seconds per unit of rows x cols^3 of one exact greedy pass here, measured once (about 0.2 s)
    on a 16 x 512 ExactOBS problem with this process's threads."""
    if not _RATE:
        from .solvers import exact_obs_prune

        gen = torch.Generator().manual_seed(0)
        rows, cols = 16, 512
        X = torch.randn(2 * cols, cols, generator=gen, dtype=torch.float64)
        H = 2 * X.t() @ X / X.shape[0]
        W = torch.randn(rows, cols, generator=gen)
        exact_obs_prune(W[:2, :64], H[:64, :64], 0.5)  # the kernel is compiled and loaded outside the timing
        t0 = time.perf_counter()
        exact_obs_prune(W, H, 0.5)
        _RATE.append((time.perf_counter() - t0) / (rows * cols ** 3))
    return _RATE[0]


def estimate_seconds(passes: int, shape: Sequence[int]) -> float:
    """Expected seconds of ``passes`` exact passes over a (groups, rows, cols) layer at ``exact_rate()``;
    0 without exact passes (the rate is then not measured)."""
    if passes <= 0:
        return 0.0
    groups, rows, cols = shape
    return passes * groups * rows * float(cols) ** 3 * exact_rate()
