"""ExactOBS pruning: exact greedy Optimal Brain Surgeon per row, unstructured, N:M and blocks.

A layer database holds, per row, the greedy elimination order and the loss of every step: O(rows x
cols) numbers. Any sparsity level is assembled from it by taking the globally cheapest steps
across rows (each row in its own order) and re-fitting each row by least squares on the weights
it keeps, which gives exactly the weights the greedy path had at that point.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from ._common import (
    FLOAT32_MAX_GROWTH_ORDER,
    MaskStructure,
    SolverResult,
    check_damp,
    check_sparsity,
    columns_last_perm,
    drifted_rows,
    layer_loss,
    loop_dtype,
    num_pruned,
    parse_mask_structure,
    prepare_layer,
    resolve_sparsity,
    serial_sum,
    undo_column_perm,
)
from ._elimination import PrunePolicy, block_trajectory, greedy_single, refit_on_support


@dataclass
class ObsDatabase:
    """Greedy elimination record of one layer, from which any sparsity level is assembled exactly."""

    structure: MaskStructure
    order: torch.Tensor  # (rows, steps) eliminated column (block index for blocks), in solver column order
    losses: torch.Tensor  # (rows, steps) loss added by each step (w.r.t. the dampened H)
    W: torch.Tensor  # original weight (caller's column order)
    H: torch.Tensor  # the H given (undamped), caller's column order
    damp: float
    seconds: float
    dtype: torch.dtype  # precision of the elimination loop (float32 also re-fits in mixed precision)
    _Wp: torch.Tensor = None  # prepared float64 weight in solver column order
    _Hp: torch.Tensor = None
    _Hinvp: torch.Tensor = None
    _perm: Optional[torch.Tensor] = None
    # N:M: the row weights at the end of the run (it stops exactly at the structure's level), so
    # assembling that level needs no re-fit.
    _final: Optional[torch.Tensor] = None
    # How the record was made: the loop's precision, rows re-fitted after drift (N:M).
    info: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes of the per-row record (orders + losses): what a database must keep per layer."""
        return self.order.numel() * self.order.element_size() + self.losses.numel() * self.losses.element_size()

    @property
    def unit(self) -> int:
        return self.structure.block if self.structure.kind == "block" else 1

    def steps_per_row(self, sparsity: Optional[float]) -> torch.Tensor:
        """Number of greedy steps each row takes at ``sparsity`` (globally cheapest steps first)."""
        rows, steps = self.order.shape
        if self.structure.kind == "nm":
            fixed = self.structure.fixed_sparsity
            if sparsity is not None and sparsity not in (0, 0.0) and abs(sparsity - fixed) > 1e-9:
                raise ValueError(
                    f"an {self.structure} database holds sparsity {fixed:g} only, not {sparsity}"
                )
            n = steps if sparsity is None or sparsity > 0 else 0
            return torch.full((rows,), n, dtype=torch.int64, device=self.order.device)
        if sparsity is None:
            raise ValueError(f"sparsity is required for mask_structure {self.structure}")
        check_sparsity(sparsity)
        total = num_pruned(sparsity, rows * steps)
        if total == 0:
            return torch.zeros(rows, dtype=torch.int64, device=self.order.device)
        # A row's step can only be taken after its earlier steps: with running-maximum keys a
        # global sort is exactly the merge that always takes the cheapest available next step.
        valid = self.order >= 0
        keys = torch.where(valid, self.losses, torch.full_like(self.losses, float("inf")))
        keys = torch.cummax(keys, dim=1).values
        flat = torch.argsort(keys.flatten(), stable=True)[:total]
        return torch.bincount(flat // steps, minlength=rows)

    def _taken(self, counts: torch.Tensor) -> torch.Tensor:
        """(rows, steps): the steps taken when each row takes its first ``counts`` steps."""
        steps = self.order.shape[1]
        return (torch.arange(steps, device=counts.device)[None, :] < counts[:, None]) & (self.order >= 0)

    def _taken_loss(self, counts: torch.Tensor) -> float:
        return serial_sum(self.losses[self._taken(counts)].double())

    def mask(self, sparsity: Optional[float]) -> torch.Tensor:
        return self._mask(self.steps_per_row(sparsity))

    def _mask(self, counts: torch.Tensor) -> torch.Tensor:
        rows = self.order.shape[0]
        taken = self._taken(counts)
        cols = self._Wp.shape[1]
        pruned_units = torch.zeros(rows, cols // self.unit, dtype=torch.bool, device=counts.device)
        # Untaken steps scatter False; a padded step (-1) would alias unit 0, so it scatters False too.
        pruned_units.scatter_reduce_(1, self.order.clamp_min(0).long(), taken, reduce="amax")
        keep = ~pruned_units.repeat_interleave(self.unit, dim=1)
        return keep

    def keep_mask(self, sparsity: Optional[float] = None) -> torch.Tensor:
        """The kept weights at ``sparsity`` in the caller's column order (no re-fit: cheap)."""
        return undo_column_perm(self.mask(sparsity), self._perm)

    def predicted_loss(self, sparsity: Optional[float] = None) -> float:
        """The sum of the taken steps' losses: the loss at ``sparsity`` w.r.t. the dampened H,
        without re-fitting (equal to ``at(sparsity).loss`` when no dampening was needed, up to the
        loop's float precision)."""
        return self._taken_loss(self.steps_per_row(sparsity))

    @classmethod
    def restore(cls, W: torch.Tensor, H: torch.Tensor, mask_structure: str, order: torch.Tensor,
                losses: torch.Tensor, damp: float, columns_last: Optional[int] = None,
                dtype: torch.dtype = torch.float32) -> "ObsDatabase":
        """A database rebuilt from its stored record (order, losses and the dampening it used) and
        the layer's W and H, without re-running the elimination."""
        cols = W.shape[1]
        structure = parse_mask_structure(mask_structure, cols)
        if order.dim() != 2 or order.shape != losses.shape or order.shape[0] != W.shape[0]:
            raise ValueError(f"a stored database of shape order {tuple(order.shape)}, losses "
                             f"{tuple(losses.shape)} does not fit a weight of shape {tuple(W.shape)}")
        damp = check_damp(damp, "damp (the level the database was built with)", auto=False)
        prep = prepare_layer(W, H, damp)
        perm = columns_last_perm(cols, columns_last, device=W.device)
        Wp, Hp, Hinvp = prep.W, prep.H, prep.Hinv
        if perm is not None:
            Wp, Hp, Hinvp = Wp[:, perm], Hp[perm][:, perm], Hinvp[perm][:, perm]
        return cls(structure=structure, order=order.to(torch.int32), losses=losses.to(torch.float32),
                   W=W.detach(), H=H.detach(), damp=float(damp), seconds=0.0, dtype=dtype,
                   _Wp=Wp, _Hp=Hp, _Hinvp=Hinvp, _perm=perm, _final=None)

    def at(self, sparsity: Optional[float] = None) -> SolverResult:
        """The compressed layer at ``sparsity``: mask, least-squares re-fitted weights, exact loss."""
        t0 = time.perf_counter()
        counts = self.steps_per_row(sparsity)
        keep = self._mask(counts)
        if self._final is not None and bool((counts == self.order.shape[1]).all()):
            Wn = self._final
        else:
            Wn = refit_on_support(self._Wp, self._Hp, self._Hinvp, keep, fast=self.dtype == torch.float32)
        predicted = self._taken_loss(counts)
        Wn, keep = undo_column_perm(Wn, self._perm), undo_column_perm(keep, self._perm)
        weight = Wn.to(self.W.dtype)
        return SolverResult(
            weight=weight,
            loss=layer_loss(self.W, weight, self.H),
            mask=keep,
            method="exact_obs",
            damp=self.damp,
            seconds=self.seconds + time.perf_counter() - t0,
            info={"mask_structure": str(self.structure), "predicted_loss": predicted, **self.info},
        )


def exact_obs_database(
    W: torch.Tensor,
    H: torch.Tensor,
    mask_structure: str = "unstructured",
    columns_last: Optional[int] = None,
    damp="auto",
    dtype="auto",
) -> ObsDatabase:
    """Run the exact greedy OBS elimination on every row of W and keep its record.

    ``columns_last``: the number of kernel taps when W is a conv weight flattened as (C, kh, kw);
    N:M groups and blocks then run over input channels at one tap. ``dtype`` is the precision of
    the elimination loop: "auto" is float32 unless H's diagonal growth exceeds
    ``_common.FLOAT32_MAX_GROWTH_ORDER`` (the factorisation and the final re-fit are always
    float64). N:M keeps the loop's final weights; rows among them whose measured loss disagrees
    with the loop's step losses (drift) are re-fitted in float64 on their mask.
    """
    t0 = time.perf_counter()
    prep = prepare_layer(W, H, damp)
    dtype = loop_dtype(dtype, prep, FLOAT32_MAX_GROWTH_ORDER)
    cols = W.shape[1]
    structure = parse_mask_structure(mask_structure, cols)
    perm = columns_last_perm(cols, columns_last, device=W.device)
    Wp, Hp, Hinvp = prep.W, prep.H, prep.Hinv
    if perm is not None:
        Wp = Wp[:, perm]
        Hp = Hp[perm][:, perm]
        Hinvp = Hinvp[perm][:, perm]
    if structure.kind == "block":
        traj = block_trajectory(Wp, Hinvp, structure.block, dtype=dtype)
    else:
        steps = cols * structure.pruned_per_group // structure.m if structure.kind == "nm" else None
        traj = greedy_single(Wp, Hp, Hinvp, PrunePolicy(structure), dtype=dtype, max_steps=steps,
                             record_final=structure.kind == "nm")
    db = ObsDatabase(
        structure=structure,
        order=traj.order.to(torch.int32),
        losses=traj.losses.to(torch.float32),
        W=W.detach(),
        H=H.detach(),
        damp=prep.damp,
        seconds=time.perf_counter() - t0,
        dtype=dtype,
        _Wp=Wp,
        _Hp=Hp,
        _Hinvp=Hinvp,
        _perm=perm,
        _final=traj.final if structure.kind == "nm" else None,
    )
    if db._final is not None:
        predicted = torch.where(db.order >= 0, db.losses.double(), torch.zeros((), dtype=torch.float64)).sum(1)
        redo = torch.nonzero(drifted_rows(Wp, db._final, Hp, predicted)).flatten()
        if redo.numel():
            keep = db.mask(None)[redo]
            db._final[redo] = refit_on_support(Wp[redo], Hp, Hinvp, keep)
        db.info["refit_rows"] = int(redo.numel())
    db.info["loop_dtype"] = str(dtype).replace("torch.", "")
    db.info["engine"] = traj.engine
    db.seconds = time.perf_counter() - t0
    return db


def exact_obs_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: Optional[float] = None,
    mask_structure: str = "unstructured",
    columns_last: Optional[int] = None,
    damp="auto",
    dtype="auto",
) -> SolverResult:
    """ExactOBS pruning of one layer to ``sparsity`` (None for N:M: the structure's own level)."""
    resolve_sparsity(sparsity, parse_mask_structure(mask_structure))
    db = exact_obs_database(W, H, mask_structure, columns_last=columns_last, damp=damp, dtype=dtype)
    return db.at(sparsity)
