"""The checks every part of obcompress applies to the same kinds of values, with one message each.

Weight and activation bits, sparsity levels, mask structures, quantization group sizes, dampening
and layer selectors are given to solvers, recipes, the search space and the cost models alike;
each is checked here, so that a value gets the same ``ValueError`` wherever it was given. ``what``
names the value in the message: an argument name, or a recipe key path such as
``quantization.num_bits``. Every check returns the value in its normal form.

This module imports nothing of obcompress: everything else may use it.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from typing import Any, Optional, Union

__all__ = [
    "MAX_BITS",
    "MIN_BITS",
    "MaskStructure",
    "check_bits",
    "check_bool",
    "check_damp",
    "check_group_size",
    "check_int",
    "check_selector",
    "check_sparsity",
    "parse_mask_structure",
    "selector_matches",
]

MIN_BITS, MAX_BITS = 2, 8


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(value: Any, what: str, minimum: int = 1, maximum: Optional[int] = None) -> int:
    """An integer (not a bool) in ``minimum``..``maximum`` (no upper bound when None)."""
    if not _is_int(value) or value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
        raise ValueError(f"{what} must be an integer {bound}, got {value!r}")
    return int(value)


def check_bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{what} must be true or false, got {value!r}")
    return value


def check_bits(value: Any, what: str = "bits") -> int:
    """A bit width of weights or activations: an integer in 2..8."""
    return check_int(value, what, MIN_BITS, MAX_BITS)


def check_sparsity(value: Any, what: str = "sparsity") -> float:
    """A fraction of weights pruned: a number in [0, 1)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0.0 <= value < 1.0:
        raise ValueError(f"{what} must be a number in [0, 1), got {value!r}")
    return float(value)


def check_group_size(value: Any, what: str = "group_size", strategy_what: str = "strategy") -> int:
    """The columns per quantization group of the "group" strategy: an integer >= 1."""
    if not _is_int(value) or value < 1:
        raise ValueError(f"{what} must be an integer >= 1 when {strategy_what} is 'group', got {value!r}")
    return int(value)


def check_damp(value: Any, what: str = "damp", auto: bool = True) -> Union[str, float]:
    """Relative dampening (a multiple of mean(diag H)): a finite number >= 0, or "auto" where the
    solvers choose it (``auto=False``: a number only)."""
    if auto and isinstance(value, str) and value == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be {repr('auto') + ' or ' if auto else ''}a number >= 0, got {value!r}")
    return float(value)


# --------------------------------------------------------------------------------------------
# mask structures


@dataclass(frozen=True)
class MaskStructure:
    """A parsed ``mask_structure``: "unstructured", "N:M" or "block:c".

    "N:M" has the meaning of the hardware and of compressed-tensors: every group of M consecutive
    columns keeps N weights (so "2:4" is 50% sparse and "1:4" is 75%). "block:c" prunes whole runs
    of c consecutive columns of a row.
    """

    kind: str  # "unstructured" | "nm" | "block"
    n: int = 0
    m: int = 0
    block: int = 1

    @property
    def pruned_per_group(self) -> int:
        return self.m - self.n

    @property
    def fixed_sparsity(self) -> Optional[float]:
        return (self.m - self.n) / self.m if self.kind == "nm" else None

    def __str__(self) -> str:
        if self.kind == "nm":
            return f"{self.n}:{self.m}"
        if self.kind == "block":
            return f"block:{self.block}"
        return "unstructured"


def parse_mask_structure(mask_structure: Any, cols: Optional[int] = None) -> MaskStructure:
    """"unstructured", "N:M" (0 < N < M) or "block:c" (c >= 1; block:1 is unstructured); with
    ``cols``, also that the columns split into whole groups or blocks."""
    if not isinstance(mask_structure, str):
        hint = ""
        if _is_int(mask_structure):
            hint = " (an unquoted N:M such as 2:4 is a base-60 number to YAML 1.1 loaders: quote it, '2:4')"
        raise ValueError(f"mask_structure must be a string: 'unstructured', 'N:M' (e.g. '2:4') or 'block:c'; "
                         f"got {mask_structure!r}{hint}")
    s = mask_structure.strip().lower()
    if s == "unstructured":
        ms = MaskStructure("unstructured")
    elif re.fullmatch(r"\d+:\d+", s):
        n, m = (int(t) for t in s.split(":"))
        if not 0 < n < m:
            raise ValueError(f"mask_structure {mask_structure!r}: need 0 < N < M for N:M")
        ms = MaskStructure("nm", n=n, m=m)
    elif re.fullmatch(r"block:\d+", s):
        c = int(s.split(":")[1])
        if c < 1:
            raise ValueError(f"mask_structure {mask_structure!r}: block size must be >= 1")
        ms = MaskStructure("block", block=c) if c > 1 else MaskStructure("unstructured")
    else:
        raise ValueError(
            f"unknown mask_structure {mask_structure!r}: use 'unstructured', 'N:M' (e.g. '2:4') or 'block:c'"
        )
    if cols is not None:
        size = ms.m if ms.kind == "nm" else ms.block
        if cols % size:
            raise ValueError(f"mask_structure {mask_structure}: {cols} columns are not divisible by {size}")
    return ms


# --------------------------------------------------------------------------------------------
# layer selectors (recipe targets, ignore and per-layer overrides; find_layers)


def check_selector(value: Any, what: str) -> str:
    """A class name, an exact module name or "re:<regex>" (fullmatched against module names)."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string (a class name, module name or 're:<regex>'), "
                         f"got {value!r}")
    if value.startswith("re:"):
        try:
            re.compile(value[3:])
        except re.error as e:
            raise ValueError(f"{what}: bad regular expression {value[3:]!r}: {e}") from None
    return value


def selector_matches(pattern: str, name: str, class_name: Optional[str]) -> bool:
    """One rule for targets, ignore and layer overrides: "re:" fullmatches the module name, anything
    else is an exact module name or a class name (``class_name`` None: names only)."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return pattern == name or (class_name is not None and pattern == class_name)
