"""The search space of non-uniform compression: the variants a layer may take, and its geometry.

A ``Variant`` is one way to compress one layer: a sparsity pattern (unstructured at a level,
N:M, or blocks of c columns at a level) and/or a weight bit width. The default space is the OBC
paper's: unstructured levels on the grid density = 0.9^k up to 99 % sparsity, block-4 up to 95 %,
2:4, weights at 8/6/4/3/2 bits, and joint combinations (2:4 and two unstructured levels, each
with every bit width). A layer takes only the variants its shape admits (N:M and blocks need
columns divisible by M or c).

``LayerGeometry`` (from ``obcompress.geometry``) is what the cost models need to know of a layer,
and nothing else: its weight shape as solver problems and how many output positions one sample
gives (tokens, pixels).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..checks import check_bits, check_bool, check_damp, check_int, check_sparsity, parse_mask_structure
from ..geometry import LayerGeometry  # noqa: F401  (part of the search's vocabulary)

__all__ = ["Variant", "SearchSpace", "LayerGeometry", "paper_levels", "default_space", "configuration_recipe"]

BIT_WIDTHS = (8, 6, 4, 3, 2)


def paper_levels(max_sparsity: float, step: float = 0.9) -> Tuple[float, ...]:
    """Sparsity levels 1 - step^k, k = 1, 2, ..., up to ``max_sparsity`` (rounded to 4 decimals,
    the precision a variant key keeps)."""
    if not 0 < step < 1:
        raise ValueError(f"the density step must be in (0, 1), got {step}")
    if not 0 < max_sparsity < 1:
        raise ValueError(f"max_sparsity must be in (0, 1), got {max_sparsity}")
    out = []
    k = 1
    while True:
        s = round(1 - step ** k, 4)
        if s > max_sparsity + 1e-12:
            break
        out.append(s)
        k += 1
    return tuple(out)


def _level_text(s: float) -> str:
    return f"{s:.4f}" if round(s, 4) == s else repr(s)


@dataclass(frozen=True)
class Variant:
    """One compressed form of a layer.

    ``structure``: "unstructured", "N:M" (N kept of every M) or "block:c"; ``sparsity``: the fraction
    of weights pruned (for N:M it is the structure's own, 1 - N/M), exactly as given, so that
    ``Variant.pruning(k, n)`` prunes exactly k of n weights wherever ``num_pruned`` counts them;
    ``bits``: weight bits, None for float weights. ``Variant()`` is the dense float layer.
    """

    structure: str = "unstructured"
    sparsity: float = 0.0
    bits: Optional[int] = None

    def __post_init__(self):
        ms = parse_mask_structure(self.structure)
        object.__setattr__(self, "structure", str(ms))
        if ms.kind == "nm":
            object.__setattr__(self, "sparsity", round(ms.fixed_sparsity, 4))
        else:
            s = check_sparsity(self.sparsity, "variant sparsity")
            if math.isnan(s):
                raise ValueError(f"variant sparsity must be in [0, 1), got {self.sparsity!r}")
            # Kept as given: a level chosen for one layer (FIT's global masks) is an exact count
            # k / n, and any rounding here would prune another number of weights on large layers.
            object.__setattr__(self, "sparsity", s)
            if ms.kind == "block" and s == 0.0:
                object.__setattr__(self, "structure", "unstructured")
        if self.bits is not None:
            check_bits(self.bits, "variant bits")

    @classmethod
    def pruning(cls, pruned: int, total: int, bits: Optional[int] = None) -> "Variant":
        """Unstructured, ``pruned`` of ``total`` weights: the level ``pruned / total`` unrounded, for
        which ``num_pruned(level, total) == pruned`` (a float's relative error is far below 1 /
        (2 total))."""
        if isinstance(pruned, bool) or isinstance(total, bool) or not isinstance(pruned, numbers.Integral) \
                or not isinstance(total, numbers.Integral) or total < 1 or not 0 <= pruned < total:
            raise ValueError(f"a pruned count must be an integer in [0, total) of total >= 1 weights, "
                             f"got {pruned!r} of {total!r}")
        return cls("unstructured", int(pruned) / int(total), bits)

    @property
    def density(self) -> float:
        return 1.0 - self.sparsity

    @property
    def pruned(self) -> bool:
        return self.sparsity > 0

    @property
    def kind(self) -> str:
        """'unstructured' | 'nm' | 'block' (of the sparsity pattern)."""
        return parse_mask_structure(self.structure).kind

    @property
    def key(self) -> str:
        """A short stable name: 'dense', 's0.5217', '2:4', 'block4@0.7500', 'w4', 's0.5217+w4', '2:4+w3'.
        A level that is not a 4-decimal number is written in full ('s0.52173828125'), so that
        ``from_key`` gives back the same variant."""
        parts = []
        if self.pruned:
            kind = self.kind
            if kind == "unstructured":
                parts.append(f"s{_level_text(self.sparsity)}")
            elif kind == "nm":
                parts.append(self.structure)
            else:
                parts.append(f"block{parse_mask_structure(self.structure).block}@{_level_text(self.sparsity)}")
        if self.bits is not None:
            parts.append(f"w{self.bits}")
        return "+".join(parts) if parts else "dense"

    @classmethod
    def from_key(cls, key: str) -> "Variant":
        if isinstance(key, int) and not isinstance(key, bool):
            raise ValueError(f"a variant key must be a string, got the number {key} (YAML 1.1 reads an unquoted "
                             "N:M such as 2:4 as a base-60 number: quote it, '2:4')")
        if not isinstance(key, str) or not key:
            raise ValueError(f"a variant key must be a non-empty string, got {key!r}")
        if key == "dense":
            return cls()
        structure, sparsity, bits = "unstructured", 0.0, None
        for part in key.split("+"):
            try:
                if part.startswith("w"):
                    bits = int(part[1:])
                elif part.startswith("s"):
                    sparsity = float(part[1:])
                elif part.startswith("block"):
                    c, lvl = part[5:].split("@")
                    structure, sparsity = f"block:{int(c)}", float(lvl)
                elif ":" in part:
                    structure = part
                else:
                    raise ValueError
            except ValueError:
                raise ValueError(f"not a variant key: {key!r} (expected e.g. 'dense', 's0.5000', '2:4+w4', "
                                 "'block4@0.7500', 'w8')") from None
        return cls(structure, sparsity, bits)

    def fits(self, cols: int) -> bool:
        """Whether a layer with ``cols`` columns per group admits this pattern."""
        try:
            parse_mask_structure(self.structure, cols)
        except ValueError:
            return False
        return True

    def recipe_entry(self, activation_bits: Optional[int] = None) -> Dict[str, Any]:
        """The per-layer recipe override that makes ``compress`` produce this variant (solver exact)."""
        out: Dict[str, Any] = {"solver": "exact"}
        if self.pruned:
            sp: Dict[str, Any] = {"mask_structure": self.structure}
            if self.kind != "nm":
                sp["sparsity"] = self.sparsity
            out["sparsity"] = sp
        else:
            out["sparsity"] = None
        if self.bits is not None:
            q: Dict[str, Any] = {"num_bits": self.bits}
            if activation_bits is not None:
                q["activations"] = {"num_bits": activation_bits}
            out["quantization"] = q
        else:
            out["quantization"] = None
        return out

    def __str__(self) -> str:
        return self.key


@dataclass(frozen=True)
class SearchSpace:
    """The variants every layer is offered (a layer keeps those its shape admits), plus the
    settings shared by all: grid symmetry and dampening, as in a recipe."""

    variants: Tuple[Variant, ...]
    symmetric: bool = True
    damp: Any = "auto"
    # Joint (pruned + quantized) variants only for layers with at least this many columns per
    # group: a depthwise filter of 9 or 25 weights has little to prune once quantized, and each of
    # its thousands of channels is a separate solve.
    joint_min_cols: int = 32

    def __post_init__(self):
        vs = tuple(self.variants)
        if not vs:
            raise ValueError("the search space has no variant")
        for v in vs:
            if not isinstance(v, Variant):
                raise ValueError(f"search space entries must be Variants, got {type(v).__name__}")
        keys = [v.key for v in vs]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            raise ValueError(f"the search space lists variants twice: {dup}")
        if Variant() not in vs:
            vs = (Variant(),) + vs  # the dense layer is always a choice: the DP's fallback
        object.__setattr__(self, "variants", vs)
        check_bool(self.symmetric, "search space symmetric")
        check_damp(self.damp, "search space damp")
        check_int(self.joint_min_cols, "search space joint_min_cols", 0)

    def for_layer(self, cols: int) -> List[Variant]:
        return [v for v in self.variants if v.fits(cols)
                and not (v.pruned and v.bits is not None and cols < self.joint_min_cols)]

    @property
    def sparsities(self) -> Tuple[float, ...]:
        """Unstructured levels the space needs from the pruning database (alone or joint)."""
        return tuple(sorted({v.sparsity for v in self.variants if v.pruned and v.kind == "unstructured"}))

    @property
    def structures(self) -> Tuple[str, ...]:
        """Pruning databases the space needs: 'unstructured', '2:4', 'block:4', ..."""
        return tuple(sorted({v.structure for v in self.variants if v.pruned}))

    def to_dict(self) -> Dict[str, Any]:
        return {"variants": [v.key for v in self.variants], "symmetric": self.symmetric, "damp": self.damp,
                "joint_min_cols": self.joint_min_cols}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SearchSpace":
        if not isinstance(d, Mapping):
            raise ValueError(f"a search space must be a mapping, got {type(d).__name__}")
        unknown = set(d) - {"variants", "symmetric", "damp", "joint_min_cols"}
        if unknown:
            raise ValueError(f"unknown search space keys: {sorted(unknown)}")
        if "variants" not in d or not isinstance(d["variants"], (list, tuple)):
            raise ValueError("a search space needs a list of variants")
        return cls(tuple(Variant.from_key(k) for k in d["variants"]), bool(d.get("symmetric", True)),
                   d.get("damp", "auto"), int(d.get("joint_min_cols", 32)))


def default_space(
    *,
    bits: Sequence[int] = BIT_WIDTHS,
    max_sparsity: float = 0.99,
    block: int = 4,
    max_block_sparsity: float = 0.95,
    nm: Optional[str] = "2:4",
    joint_levels: Sequence[int] = (7, 13),
    joint: bool = True,
    step: float = 0.9,
) -> SearchSpace:
    """The OBC paper's space. ``joint_levels``: the k of the unstructured levels 1 - 0.9^k that are
    also combined with every bit width (default about 52 % and 75 %; 2:4 is joint with every bit
    width too)."""
    levels = paper_levels(max_sparsity, step)
    out: List[Variant] = [Variant()]
    out += [Variant("unstructured", s) for s in levels]
    if block:
        out += [Variant(f"block:{block}", s) for s in paper_levels(max_block_sparsity, step)]
    if nm:
        out.append(Variant(nm))
    out += [Variant(bits=b) for b in bits]
    if joint:
        if nm:
            out += [Variant(nm, bits=b) for b in bits]
        for k in joint_levels:
            if not 1 <= k <= len(levels):
                raise ValueError(f"joint level k={k} is not on the grid 1..{len(levels)}")
            out += [Variant("unstructured", levels[k - 1], b) for b in bits]
    return SearchSpace(tuple(out))


def configuration_recipe(choice: Mapping[str, Any], *, activation_bits: Optional[int] = None,
                         damp: Any = "auto", symmetric: bool = True) -> Dict[str, Any]:
    """The recipe that ``compress`` applies as it is to give every layer of ``choice`` ({layer name:
    Variant or key}) its variant with the exact OBC solvers; dense layers are left out of the targets."""
    if not isinstance(choice, Mapping) or not choice:
        raise ValueError("choice must be a non-empty {layer: Variant} mapping")
    layers: Dict[str, Any] = {}
    for name, v in choice.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"layer names must be non-empty strings, got {name!r}")
        v = v if isinstance(v, Variant) else Variant.from_key(v)
        if v == Variant():
            continue
        entry = v.recipe_entry(activation_bits)
        if not symmetric and entry.get("quantization"):
            entry["quantization"]["symmetric"] = False
        layers[name] = entry
    if not layers:
        raise ValueError("the configuration keeps every layer dense: there is nothing to compress")
    return {"solver": "exact", "damp": damp, "targets": list(layers), "layers": layers}
