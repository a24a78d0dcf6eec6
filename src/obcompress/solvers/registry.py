"""The layer solvers a recipe can name, each with what it can do.

A solver here is one call on one layer, ``solve(W, H, grid=..., mask_structure=..., sparsity=...,
columns_last=..., damp=..., act_order=...)``: prune when ``mask_structure`` is given (with
``sparsity``, which N:M fixes itself), quantize onto ``grid`` when one is given, both at once
(joint) when both are. Its ``SolverSpec`` says what it can do -- whether it needs H to choose
(the data-free baselines take H only to report the loss), which of prune / quantize / joint it
supports, which mask structures, whether GPTQ's act-order applies -- and ``SolverSpec.solve``
refuses anything else with one ``ValueError`` before any work. ``api.compress`` dispatches
through ``SOLVERS``, recipes check their sections against it, ``obcompress compress --help``
lists it, and the conformance suite (tests/solvers/test_solver_registry.py) runs every solver in it:
a new solver gets all of that by ``register``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, List, Optional, Tuple

import torch

from ._common import SolverResult, layer_loss, parse_mask_structure
from .baselines import magnitude_prune, rtn_quantize
from .gptq import gptq_quantize, sparsegpt_prune
from .grid import QuantGrid
from .obq import obq_quantize
from .obs import exact_obs_prune

__all__ = ["MODES", "SOLVERS", "SolverSpec", "describe", "get_solver", "register", "solvers_that"]

MODES = ("prune", "quantize", "joint")
STRUCTURE_KINDS = ("unstructured", "nm", "block")
_KIND_NAMES = {"unstructured": "unstructured", "nm": "N:M", "block": "block"}
# "auto" dampening for the fixed-order solvers is what their authors use: 1 % of mean(diag H).
FIXED_ORDER_DAMP = 0.01


@dataclass(frozen=True)
class SolverSpec:
    """A registered solver: its name, what it can do, and the call that does it."""

    name: str
    summary: str
    run: Callable[..., SolverResult]  # run(W, H, grid, mask_structure, sparsity, columns_last, damp, act_order)
    needs_hessian: bool  # False: H only measures the loss (the data-free baselines)
    modes: FrozenSet[str]  # of "prune", "quantize", "joint"
    structures: Tuple[str, ...] = ()  # mask structure kinds it prunes: "unstructured", "nm", "block"
    act_order: bool = False  # GPTQ's activation order (quantization.act_order)

    @property
    def prunes(self) -> bool:
        return "prune" in self.modes or "joint" in self.modes

    @property
    def quantizes(self) -> bool:
        return "quantize" in self.modes or "joint" in self.modes

    @property
    def joint(self) -> bool:
        return "joint" in self.modes

    def check(self, quantize: bool, structure: Optional[str], act_order: bool = False) -> None:
        """ValueError (naming the solver and what it cannot do) unless it can quantize (``quantize``)
        and/or prune with a mask of ``structure`` (None: no pruning), with ``act_order``."""
        prune = structure is not None
        if act_order and not self.act_order:
            raise ValueError(f"act_order is only supported by solver {_names(solvers_that(act_order=True))}, "
                             f"not {self.name!r}")
        if not prune and not quantize:
            raise ValueError(f"solver {self.name!r} was given nothing to do: no grid and no mask structure")
        if quantize and not self.quantizes:
            raise ValueError(f"solver {self.name!r} cannot quantize: use {_names(solvers_that('quantize'))}")
        if prune and not self.prunes:
            raise ValueError(f"solver {self.name!r} cannot prune: use {_names(solvers_that('prune'))} to prune")
        mode = "joint" if prune and quantize else "prune" if prune else "quantize"
        if mode not in self.modes:
            needs = "a grid (quantization)" if mode == "prune" else "a mask structure (sparsity)"
            raise ValueError(f"solver {self.name!r} needs {needs}: it supports {', '.join(sorted(self.modes))}")
        if prune:
            kind = parse_mask_structure(structure).kind
            if kind not in self.structures:
                others = [s.name for s in SOLVERS.values() if kind in s.structures]
                raise ValueError(f"solver {self.name!r} does not support {_KIND_NAMES[kind]} masks ({structure}); "
                                 f"use {_names(others)}")

    def solve(self, W: torch.Tensor, H: Optional[torch.Tensor], *, grid: Optional[QuantGrid] = None,
              mask_structure: Optional[str] = None, sparsity: Optional[float] = None,
              columns_last: Optional[int] = None, damp="auto", act_order: bool = False) -> SolverResult:
        """Compress one layer's W (rows x cols) given its Hessian H: prune to ``sparsity`` with
        ``mask_structure`` when that is given, quantize onto ``grid`` when that is given. The result's
        loss is ``layer_loss(W, result.weight, H)``."""
        self.check(grid is not None, mask_structure, act_order)
        if H is None and self.needs_hessian:
            raise ValueError(f"solver {self.name!r} needs the layer's Hessian H")
        if mask_structure is None and sparsity is not None:
            raise ValueError("sparsity given without a mask_structure")
        return self.run(W, H, grid, mask_structure, sparsity, columns_last, damp, act_order)


def _names(names) -> str:
    names = [repr(n) for n in names]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


SOLVERS: Dict[str, SolverSpec] = {}


def register(spec: SolverSpec) -> SolverSpec:
    """Add ``spec`` to ``SOLVERS`` (a name given twice is an error)."""
    if not isinstance(spec, SolverSpec):
        raise ValueError(f"register takes a SolverSpec, got {type(spec).__name__}")
    if spec.name in SOLVERS:
        raise ValueError(f"a solver named {spec.name!r} is registered already")
    bad = set(spec.modes) - set(MODES)
    if not spec.modes or bad:
        raise ValueError(f"solver {spec.name!r}: modes must be a non-empty subset of {MODES}, got {sorted(spec.modes)}")
    if spec.prunes != bool(spec.structures) or not set(spec.structures) <= set(STRUCTURE_KINDS):
        raise ValueError(f"solver {spec.name!r}: a pruning solver lists the structures it supports "
                         f"(of {STRUCTURE_KINDS}), any other none")
    SOLVERS[spec.name] = spec
    return spec


def get_solver(name: str) -> SolverSpec:
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}: the solvers are {', '.join(SOLVERS)}")
    return SOLVERS[name]


def solvers_that(mode: Optional[str] = None, *, act_order: Optional[bool] = None) -> List[str]:
    """Names of the registered solvers that can ``mode`` ("prune", "quantize", "joint"; a prune or
    quantize capability includes doing it jointly) and, if given, have ``act_order``."""
    out = []
    for s in SOLVERS.values():
        if mode == "prune" and not s.prunes or mode == "quantize" and not s.quantizes or mode == "joint" and not s.joint:
            continue
        if act_order is not None and s.act_order != act_order:
            continue
        out.append(s.name)
    return out


def describe() -> str:
    """One line per registered solver: name, what it does, and what it can do."""
    lines = []
    for s in SOLVERS.values():
        can = [m for m in MODES if m in s.modes]
        what = ", ".join(can)
        if s.structures:
            what += " (" + ", ".join(_KIND_NAMES[k] for k in s.structures) + ")"
        if s.act_order:
            what += ", act_order"
        lines.append(f"{s.name:<10} {s.summary}; {what}; {'uses H' if s.needs_hessian else 'data-free'}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the solvers


def _fixed_order_damp(damp):
    return FIXED_ORDER_DAMP if isinstance(damp, str) and damp == "auto" else damp


def _exact(W, H, grid, mask_structure, sparsity, columns_last, damp, act_order):
    pruned = None
    if mask_structure is not None:
        pruned = exact_obs_prune(W, H, sparsity, mask_structure, columns_last=columns_last, damp=damp)
    if grid is None:
        return pruned
    result = obq_quantize(W, H, grid, mask=None if pruned is None else pruned.mask, damp=damp)
    if pruned is not None:
        result.method = "obs+obq"  # joint OBC: the ExactOBS mask, then OBQ on the kept weights
    return result


def _best(W, H, grid, mask_structure, sparsity, columns_last, damp, act_order):
    result = _exact(W, H, grid, mask_structure, sparsity, columns_last, damp, act_order)
    if mask_structure is None:
        # Greedy OBQ is not always the lowest loss (GPTQ with act-order often is, e.g. on MiniLM's
        # ill-conditioned layers); both are cheap to measure on the same H, keep the lower.
        alt = gptq_quantize(W, H, grid, act_order=True, damp=_fixed_order_damp(damp))
        if alt.loss < result.loss:
            alt.method = "gptq-act"
            return alt
    return result


def _gptq(W, H, grid, mask_structure, sparsity, columns_last, damp, act_order):
    return gptq_quantize(W, H, grid, act_order=act_order, damp=_fixed_order_damp(damp))


def _sparsegpt(W, H, grid, mask_structure, sparsity, columns_last, damp, act_order):
    return sparsegpt_prune(W, H, sparsity, mask_structure, grid=grid, damp=_fixed_order_damp(damp),
                           columns_last=columns_last)


def _magnitude(W, H, grid, mask_structure, sparsity, columns_last, damp, act_order):
    pruned = magnitude_prune(W, sparsity, mask_structure, H=H, columns_last=columns_last)
    if grid is None:
        return pruned
    q = rtn_quantize(pruned.weight, grid, H=H)
    loss = layer_loss(W, q.weight, H) if H is not None else float("nan")
    return SolverResult(weight=q.weight, loss=loss, mask=pruned.mask, grid=grid, method="magnitude+rtn",
                        seconds=pruned.seconds + q.seconds, info={**pruned.info, **q.info})


def _rtn(W, H, grid, mask_structure, sparsity, columns_last, damp, act_order):
    return rtn_quantize(W, grid, H=H)


_ALL = ("unstructured", "nm", "block")
register(SolverSpec("exact", "ExactOBS pruning / OBQ quantization, exact greedy (joint: OBC)", _exact, True,
                    frozenset(MODES), _ALL))
register(SolverSpec("best", "as exact; quantizing alone also runs GPTQ act-order and keeps the lower loss", _best,
                    True, frozenset(MODES), _ALL))
register(SolverSpec("gptq", "GPTQ, fixed column order with lazy batch updates", _gptq, True,
                    frozenset({"quantize"}), act_order=True))
register(SolverSpec("sparsegpt", "SparseGPT, fixed order, optionally quantizing in the same pass", _sparsegpt, True,
                    frozenset({"prune", "joint"}), ("unstructured", "nm")))
register(SolverSpec("magnitude", "magnitude pruning (then round-to-nearest when quantizing)", _magnitude, False,
                    frozenset({"prune", "joint"}), _ALL))
register(SolverSpec("rtn", "round-to-nearest on the grid", _rtn, False, frozenset({"quantize"})))
