"""Recipes: how to compress a model, in the vocabulary of llm-compressor / compressed-tensors.

A recipe is a YAML document or a dict::

    targets: [Linear, Conv2d]        # optional (default: every compressible layer); class names,
                                     # exact module names or "re:<regex>" (fullmatch on the module name)
    ignore: ["re:.*classifier.*", conv1]
    solver: exact                    # exact | best | gptq | sparsegpt | magnitude | rtn: the solvers
                                     # registry (obcompress.solvers.registry) and what each can do
    quantization:                    # optional
      num_bits: 4                    # 2..8
      symmetric: true
      strategy: channel              # tensor | channel | group
      group_size: null               # an int >= 1 iff strategy == group
      mse: false                     # MSE clip search of the grid
      act_order: false               # gptq only
      activations:                   # optional: W+A, per-tensor input quantizers
        num_bits: 8
        symmetric: true
        mse: true                    # MSE-clipped range (false: plain min-max)
    sparsity:                        # optional
      sparsity: 0.5                  # [0, 1); may be omitted for N:M (the structure fixes it)
      mask_structure: unstructured   # unstructured | "N:M" | "block:c"
    damp: auto                       # "auto" or a number >= 0
    calibration: parallel            # parallel | sequential
    corrections: {bn_reestimation: false, statistics_correction: false}
    layers:                          # per-layer overrides (module names or "re:" patterns)
      features.3.conv: {quantization: {num_bits: 8}, sparsity: {sparsity: 0.3}}

Everything is validated up front: each problem is one ``RecipeError`` (a ``ValueError``) whose
message names the key path. An override is a partial recipe (keys ``solver``, ``damp``,
``quantization``, ``sparsity``) deep-merged over the top-level settings; ``quantization: null`` or
``sparsity: null`` removes that section for the matched layers. Setting an N:M ``mask_structure``
without a ``sparsity`` drops the inherited sparsity level, since the structure fixes it; setting a
``strategy`` other than group without a ``group_size`` drops the inherited group size.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import yaml

from .checks import (
    MaskStructure,
    check_bits,
    check_bool,
    check_damp,
    check_group_size,
    check_selector,
    check_sparsity,
    parse_mask_structure,
    selector_matches,
)
from .solvers.registry import SOLVERS as SOLVER_REGISTRY
from .solvers.registry import solvers_that

__all__ = [
    "ActivationScheme",
    "Corrections",
    "LayerScheme",
    "QuantizationScheme",
    "Recipe",
    "RecipeError",
    "SparsityScheme",
]

# The solvers a recipe can name: the registry's (solvers.registry), which says what each can do.
SOLVERS = tuple(SOLVER_REGISTRY)
STRATEGIES = ("tensor", "channel", "group")
CALIBRATION_MODES = ("parallel", "sequential")

_TOP_KEYS = ("targets", "ignore", "solver", "quantization", "sparsity", "damp", "calibration",
             "corrections", "layers")
_OVERRIDE_KEYS = ("solver", "damp", "quantization", "sparsity")
_QUANT_KEYS = ("num_bits", "symmetric", "strategy", "group_size", "mse", "act_order", "activations")
_ACT_KEYS = ("num_bits", "symmetric", "mse")
_SPARSITY_KEYS = ("sparsity", "mask_structure", "unfit_layers")
# What a sparsity section does with a layer whose columns its N:M groups or blocks do not divide.
UNFIT_CHOICES = ("error", "dense")
_CORRECTION_KEYS = ("bn_reestimation", "statistics_correction")


class RecipeError(ValueError):
    """A recipe problem; the message names the key path."""


def _fail(msg: str) -> RecipeError:
    return RecipeError(f"recipe: {msg}")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# --------------------------------------------------------------------------------------------
# YAML: safe loading without YAML 1.1's base-60 integers, so that an unquoted `2:4` stays the
# string "2:4" (yaml.safe_load reads it as 124), and with `1e-2` read as a float (not a string).

class _RecipeLoader(yaml.SafeLoader):
    pass


_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT_TAG, _FLOAT_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_RecipeLoader.add_implicit_resolver(
    _INT_TAG,
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)
_RecipeLoader.add_implicit_resolver(
    _FLOAT_TAG,
    re.compile(r"^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?"
               r"|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+"
               r"|[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


def _load_yaml(text: str, what: str) -> Any:
    try:
        return yaml.load(text, Loader=_RecipeLoader)  # a SafeLoader: plain data only
    except yaml.YAMLError as e:
        raise _fail(f"invalid YAML in {what}: {e}") from None


# --------------------------------------------------------------------------------------------
# Field checks. Each takes the key path it reports.

def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _check_keys(d: Mapping, allowed: Sequence[str], path: str) -> None:
    for k in d:
        if not isinstance(k, str):
            raise _fail(f"key {k!r} in {path or 'the recipe'} is not a string")
        if k not in allowed:
            shown = _join(path, k)
            close = difflib.get_close_matches(k, allowed, n=1, cutoff=0.6)
            hint = f"did you mean {_join(path, close[0])!r}?" if close else f"allowed: {', '.join(allowed)}"
            raise _fail(f"unknown key {shown!r} ({hint})")


def _check_mapping(v: Any, path: str) -> Mapping:
    if not isinstance(v, Mapping):
        raise _fail(f"{path} must be a mapping, got {_type_name(v)} {v!r}")
    return v


def _checked(check, value: Any, path: str, *more) -> Any:
    """``check(value, path, *more)`` from obcompress.checks, its ValueError as a RecipeError."""
    try:
        return check(value, path, *more)
    except ValueError as e:
        raise _fail(str(e)) from None


def _check_bool(v: Any, path: str) -> bool:
    return _checked(check_bool, v, path)


def _check_bits(v: Any, path: str) -> int:
    return _checked(check_bits, v, path)


def _check_choice(v: Any, choices: Sequence[str], path: str) -> str:
    if not isinstance(v, str) or v not in choices:
        close = difflib.get_close_matches(v, choices, n=1, cutoff=0.6) if isinstance(v, str) else []
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise _fail(f"{path} must be one of {', '.join(choices)}; got {v!r}{hint}")
    return v


def _check_damp(v: Any, path: str) -> Union[str, float]:
    return _checked(check_damp, v, path)


def _check_mask_structure(v: Any, path: str) -> MaskStructure:
    try:
        return parse_mask_structure(v)
    except ValueError as e:
        raise _fail(f"{path}: {e}") from None


def _name(v: Any, path: str) -> str:
    # Module names in nn.Sequential are digits, which YAML reads as integers.
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    return _checked(check_selector, v, path)


def _name_list(v: Any, path: str) -> Tuple[str, ...]:
    if isinstance(v, (str, int)) and not isinstance(v, bool):
        v = [v]
    if not isinstance(v, (list, tuple)):
        raise _fail(f"{path} must be a list of names, got {_type_name(v)} {v!r}")
    return tuple(_name(x, f"{path}[{i}]") for i, x in enumerate(v))


# --------------------------------------------------------------------------------------------
# Sections.

@dataclass(frozen=True)
class ActivationScheme:
    """Per-tensor quantizer of a layer's input (the "A" of W+A settings)."""

    num_bits: int
    symmetric: bool = True
    mse: bool = True

    def __post_init__(self):
        _act_values(self.__dict__, "quantization.activations")

    @classmethod
    def from_dict(cls, d: Any, path: str = "quantization.activations") -> "ActivationScheme":
        return cls(**_act_values(d, path))

    def to_dict(self) -> Dict[str, Any]:
        return {"num_bits": self.num_bits, "symmetric": self.symmetric, "mse": self.mse}


def _act_values(d: Any, path: str) -> Dict[str, Any]:
    d = _check_mapping(d, path)
    _check_keys(d, _ACT_KEYS, path)
    if "num_bits" not in d:
        raise _fail(f"{_join(path, 'num_bits')} is required")
    return {
        "num_bits": _check_bits(d["num_bits"], _join(path, "num_bits")),
        "symmetric": _check_bool(d.get("symmetric", True), _join(path, "symmetric")),
        "mse": _check_bool(d.get("mse", True), _join(path, "mse")),
    }


@dataclass(frozen=True)
class QuantizationScheme:
    """Weight quantization: a uniform grid of ``num_bits`` per tensor, channel (row) or group."""

    num_bits: int
    symmetric: bool = True
    strategy: str = "channel"
    group_size: Optional[int] = None
    mse: bool = False
    act_order: bool = False
    activations: Optional[ActivationScheme] = None

    def __post_init__(self):
        d = dict(self.__dict__)
        if isinstance(self.activations, ActivationScheme):
            d["activations"] = self.activations.to_dict()
        _quant_values(d, "quantization")

    @classmethod
    def from_dict(cls, d: Any, path: str = "quantization") -> "QuantizationScheme":
        return cls(**_quant_values(d, path))

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {
            "num_bits": self.num_bits, "symmetric": self.symmetric, "strategy": self.strategy,
            "group_size": self.group_size, "mse": self.mse, "act_order": self.act_order,
        }
        if self.activations is not None:
            out["activations"] = self.activations.to_dict()
        return out

    def grid_kwargs(self) -> Dict[str, Any]:
        """Keyword arguments of ``QuantGrid.fit(W, **kwargs)``."""
        return {"bits": self.num_bits, "symmetric": self.symmetric, "strategy": self.strategy,
                "group_size": self.group_size, "mse": self.mse}


def _quant_values(d: Any, path: str) -> Dict[str, Any]:
    d = _check_mapping(d, path)
    _check_keys(d, _QUANT_KEYS, path)
    if "num_bits" not in d:
        raise _fail(f"{_join(path, 'num_bits')} is required")
    out = {
        "num_bits": _check_bits(d["num_bits"], _join(path, "num_bits")),
        "symmetric": _check_bool(d.get("symmetric", True), _join(path, "symmetric")),
        "strategy": _check_choice(d.get("strategy", "channel"), STRATEGIES, _join(path, "strategy")),
        "mse": _check_bool(d.get("mse", False), _join(path, "mse")),
        "act_order": _check_bool(d.get("act_order", False), _join(path, "act_order")),
    }
    gs = d.get("group_size")
    gpath = _join(path, "group_size")
    if out["strategy"] == "group":
        gs = _checked(check_group_size, gs, gpath, _join(path, "strategy"))
    elif gs is not None:
        raise _fail(f"{gpath} is only used with {_join(path, 'strategy')}: group "
                    f"(strategy is {out['strategy']!r}); remove it or set it to null")
    out["group_size"] = gs
    act = d.get("activations")
    if isinstance(act, ActivationScheme):
        out["activations"] = act
    else:
        out["activations"] = None if act is None else ActivationScheme(**_act_values(act, _join(path, "activations")))
    return out


@dataclass(frozen=True)
class SparsityScheme:
    """Pruning: a sparsity level and a mask structure ("unstructured", "N:M" keeping N of M, "block:c")."""

    sparsity: Optional[float] = None
    mask_structure: str = "unstructured"
    # "error": such a layer stops compress with a message naming the fixes; "dense": it is left
    # unpruned (still quantized if the recipe quantizes) and listed in the result's ``unfit``.
    unfit_layers: str = "error"

    def __post_init__(self):
        v = _sparsity_values(self.__dict__, "sparsity")
        object.__setattr__(self, "sparsity", v["sparsity"])
        object.__setattr__(self, "mask_structure", v["mask_structure"])
        object.__setattr__(self, "unfit_layers", v["unfit_layers"])

    @classmethod
    def from_dict(cls, d: Any, path: str = "sparsity") -> "SparsityScheme":
        return cls(**_sparsity_values(d, path))

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        if self.sparsity is not None:
            out["sparsity"] = self.sparsity
        out["mask_structure"] = self.mask_structure
        if self.unfit_layers != "error":
            out["unfit_layers"] = self.unfit_layers
        return out

    @property
    def structure(self) -> MaskStructure:
        return parse_mask_structure(self.mask_structure)

    @property
    def target(self) -> float:
        """The fraction of weights pruned: the level given, or the one an N:M structure fixes."""
        if self.sparsity is not None:
            return self.sparsity
        return float(self.structure.fixed_sparsity)


def _sparsity_values(d: Any, path: str) -> Dict[str, Any]:
    d = _check_mapping(d, path)
    _check_keys(d, _SPARSITY_KEYS, path)
    ms = _check_mask_structure(d.get("mask_structure", "unstructured"), _join(path, "mask_structure"))
    s = d.get("sparsity")
    spath = _join(path, "sparsity")
    if s is None:
        if ms.fixed_sparsity is None:
            raise _fail(f"{spath} is required for {_join(path, 'mask_structure')}: {ms} "
                        "(only N:M structures fix their own sparsity)")
    else:
        s = _checked(check_sparsity, s, spath)
        fixed = ms.fixed_sparsity
        if fixed is not None and abs(s - fixed) > 1e-9:
            raise _fail(f"{spath}={s:g} contradicts {_join(path, 'mask_structure')}: {ms}, which is "
                        f"{fixed:g} sparse; omit {spath}")
    unfit = _check_choice(d.get("unfit_layers", "error"), UNFIT_CHOICES, _join(path, "unfit_layers"))
    return {"sparsity": s, "mask_structure": str(ms), "unfit_layers": unfit}


@dataclass(frozen=True)
class Corrections:
    """Model-level corrections after compression (DESIGN §4 / issue 3 item 3)."""

    bn_reestimation: bool = False
    statistics_correction: bool = False

    def __post_init__(self):
        _corrections_values(self.__dict__, "corrections")

    def to_dict(self) -> Dict[str, Any]:
        return {"bn_reestimation": self.bn_reestimation, "statistics_correction": self.statistics_correction}


def _corrections_values(d: Any, path: str) -> Dict[str, bool]:
    d = _check_mapping(d, path)
    _check_keys(d, _CORRECTION_KEYS, path)
    return {k: _check_bool(d.get(k, False), _join(path, k)) for k in _CORRECTION_KEYS}


@dataclass(frozen=True)
class LayerScheme:
    """The resolved settings for one layer."""

    solver: str
    quantization: Optional[QuantizationScheme]
    sparsity: Optional[SparsityScheme]
    damp: Union[str, float] = "auto"

    def __post_init__(self):
        _check_choice(self.solver, SOLVERS, "solver")
        _check_damp(self.damp, "damp")
        _check_combination(self.solver, self.quantization, self.sparsity, "")

    @property
    def bits(self) -> Optional[int]:
        return None if self.quantization is None else self.quantization.num_bits

    @property
    def target_sparsity(self) -> float:
        return 0.0 if self.sparsity is None else self.sparsity.target

    @property
    def compresses(self) -> bool:
        return self.quantization is not None or self.target_sparsity > 0

    def to_dict(self) -> Dict[str, Any]:
        return {
            "solver": self.solver,
            "quantization": None if self.quantization is None else self.quantization.to_dict(),
            "sparsity": None if self.sparsity is None else self.sparsity.to_dict(),
            "damp": self.damp,
        }


def _check_combination(solver: str, q: Optional[QuantizationScheme], s: Optional[SparsityScheme],
                       where: str) -> None:
    """What the solver can do with the sections present, as the registry says (an empty scheme is
    left to the caller)."""
    spec = SOLVER_REGISTRY[solver]
    if q is not None and q.act_order and not spec.act_order:
        raise _fail(f"{where}quantization.act_order is only supported by solver "
                    f"{_names(solvers_that(act_order=True))}, not {solver!r}")
    if q is None and s is None:
        return
    missing = _missing_section(spec, q is not None, s is not None)
    if missing:
        raise _fail(f"{where}solver {solver!r} needs a {missing} section")
    if s is not None and not spec.prunes:
        raise _fail(f"{where}solver {solver!r} cannot prune: remove the sparsity section, or use solver "
                    f"{_names(solvers_that('prune'))} to prune")
    if q is not None and not spec.quantizes:
        raise _fail(f"{where}solver {solver!r} cannot quantize: remove the quantization section, or use solver "
                    f"{_names(solvers_that('quantize'))} to quantize")
    if q is not None and s is not None and not spec.joint:
        raise _fail(f"{where}solver {solver!r} cannot prune and quantize at once: use solver "
                    f"{_names(solvers_that('joint'))}")
    kind = s.structure.kind if s is not None else None
    if kind is not None and kind not in spec.structures:
        others = [n for n, o in SOLVER_REGISTRY.items() if kind in o.structures]
        raise _fail(f"{where}solver {solver!r} does not support {_KIND_NAMES[kind]} masks ({s.mask_structure}); "
                    f"use solver {_names(others)}")


_KIND_NAMES = {"unstructured": "unstructured", "nm": "N:M", "block": "block"}


def _missing_section(spec, quantization: bool, sparsity: bool) -> Optional[str]:
    """The section a solver cannot do without: a quantizer that cannot prune needs quantization, a
    pruner that cannot quantize alone needs sparsity."""
    if not spec.prunes and not quantization:
        return "quantization"
    if "quantize" not in spec.modes and not sparsity:
        return "sparsity"
    return None


def _names(names: Sequence[str]) -> str:
    names = [repr(n) for n in names]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def _scheme_from_dict(d: Mapping, where: str) -> LayerScheme:
    """A LayerScheme from a merged {solver, damp, quantization, sparsity} dict; ``where`` prefixes paths."""
    p = where.rstrip(": ").strip()
    solver = _check_choice(d.get("solver", "exact"), SOLVERS, _join(p, "solver"))
    damp = _check_damp(d.get("damp", "auto"), _join(p, "damp"))
    q = d.get("quantization")
    q = None if q is None else QuantizationScheme(**_quant_values(q, _join(p, "quantization")))
    s = d.get("sparsity")
    s = None if s is None else SparsityScheme(**_sparsity_values(s, _join(p, "sparsity")))
    _check_combination(solver, q, s, where)
    return LayerScheme(solver, q, s, damp)


def _merge(base: Mapping, over: Mapping) -> Dict[str, Any]:
    """Deep merge: mappings merge key by key, anything else (null included) replaces."""
    out = {k: copy.deepcopy(v) for k, v in base.items()}
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            sub = _merge(out[k], v)
            # An N:M structure fixes its sparsity: an inherited level would only contradict it.
            if k == "sparsity" and "sparsity" not in v and _is_nm(v.get("mask_structure")):
                sub.pop("sparsity", None)
            # Likewise a group size only means something to the group strategy.
            if k == "quantization" and "group_size" not in v and v.get("strategy", "group") != "group":
                sub["group_size"] = None
            out[k] = sub
        else:
            out[k] = copy.deepcopy(v)
    return out


def _is_nm(v: Any) -> bool:
    try:
        return isinstance(v, str) and parse_mask_structure(v).kind == "nm"
    except ValueError:
        return False


# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Recipe:
    """A validated recipe. Build it with ``from_dict`` / ``from_yaml``; it is immutable."""

    solver: str = "exact"
    quantization: Optional[QuantizationScheme] = None
    sparsity: Optional[SparsityScheme] = None
    targets: Optional[Tuple[str, ...]] = None  # None: every compressible layer
    ignore: Tuple[str, ...] = ()
    damp: Union[str, float] = "auto"
    calibration: str = "parallel"
    corrections: Corrections = field(default_factory=Corrections)
    layers: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self):
        _check_choice(self.solver, SOLVERS, "solver")
        object.__setattr__(self, "damp", _check_damp(self.damp, "damp"))
        _check_choice(self.calibration, CALIBRATION_MODES, "calibration")
        if self.targets is not None:
            object.__setattr__(self, "targets", _name_list(self.targets, "targets"))
            if not self.targets:
                raise _fail("targets is empty: it selects no layer (omit it to target every compressible layer)")
        object.__setattr__(self, "ignore", _name_list(self.ignore, "ignore"))
        if not isinstance(self.corrections, Corrections):
            raise _fail(f"corrections must be a mapping, got {self.corrections!r}")
        object.__setattr__(self, "layers", _layers_values(self.layers, "layers"))

        base = _scheme_from_dict(self._base_dict(), "")
        object.__setattr__(self, "_base", base)
        compresses = base.compresses
        for key, over in self.layers.items():
            where = f"layers.{key}: "
            merged = _scheme_from_dict(_merge(self._base_dict(), over), where)
            compresses = compresses or merged.compresses
        if not compresses:
            missing = _missing_section(SOLVER_REGISTRY[self.solver], self.quantization is not None,
                                       self.sparsity is not None)
            if missing:
                raise _fail(f"solver {self.solver!r} needs a {missing} section")
            raise _fail("compresses nothing: give a quantization section and/or a sparsity section with "
                        "sparsity > 0 (at the top level or in layers overrides)")

    # ---- construction ------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: Any) -> "Recipe":
        if isinstance(d, Recipe):
            return d
        if d is None:
            raise _fail("the recipe is empty")
        if not isinstance(d, Mapping):
            raise _fail(f"a recipe must be a mapping, got {_type_name(d)} {d!r}")
        _check_keys(d, _TOP_KEYS, "")
        kw: Dict[str, Any] = {}
        if "solver" in d:
            kw["solver"] = _check_choice(d["solver"], SOLVERS, "solver")
        if d.get("quantization") is not None:
            kw["quantization"] = QuantizationScheme.from_dict(d["quantization"], "quantization")
        if d.get("sparsity") is not None:
            kw["sparsity"] = SparsityScheme.from_dict(d["sparsity"], "sparsity")
        if d.get("targets") is not None:
            kw["targets"] = _name_list(d["targets"], "targets")
        if d.get("ignore") is not None:
            kw["ignore"] = _name_list(d["ignore"], "ignore")
        if "damp" in d:
            kw["damp"] = _check_damp(d["damp"], "damp")
        if "calibration" in d:
            kw["calibration"] = _check_choice(d["calibration"], CALIBRATION_MODES, "calibration")
        if d.get("corrections") is not None:
            kw["corrections"] = Corrections(**_corrections_values(d["corrections"], "corrections"))
        if d.get("layers") is not None:
            kw["layers"] = _layers_values(d["layers"], "layers")
        return cls(**kw)

    @classmethod
    def from_yaml(cls, path_or_text: Union[str, os.PathLike]) -> "Recipe":
        """A recipe from a YAML file (when ``path_or_text`` names an existing file) or YAML text."""
        if isinstance(path_or_text, os.PathLike) or (
            isinstance(path_or_text, str) and "\n" not in path_or_text and os.path.isfile(path_or_text)
        ):
            p = Path(path_or_text)
            if not p.is_file():
                raise _fail(f"recipe file not found: {p}")
            return cls.from_dict(_load_yaml(p.read_text(encoding="utf-8"), str(p)))
        if not isinstance(path_or_text, str):
            raise _fail(f"from_yaml needs a path or YAML text, got {_type_name(path_or_text)}")
        text = path_or_text
        if "\n" not in text and text.strip().lower().endswith((".yaml", ".yml")):
            raise _fail(f"recipe file not found: {text}")
        return cls.from_dict(_load_yaml(text, "the recipe text"))

    # ---- output ------------------------------------------------------------------------

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        if self.targets is not None:
            out["targets"] = list(self.targets)
        out["ignore"] = list(self.ignore)
        out["solver"] = self.solver
        if self.quantization is not None:
            out["quantization"] = self.quantization.to_dict()
        if self.sparsity is not None:
            out["sparsity"] = self.sparsity.to_dict()
        out["damp"] = self.damp
        out["calibration"] = self.calibration
        out["corrections"] = self.corrections.to_dict()
        if self.layers:
            out["layers"] = copy.deepcopy({k: dict(v) for k, v in self.layers.items()})
        return out

    def to_yaml(self) -> str:
        # safe_dump quotes strings such as '2:4' that a YAML 1.1 reader would take for numbers.
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    # ---- edits -------------------------------------------------------------------------

    def with_overrides(self, items: Iterable[str]) -> "Recipe":
        """A new validated recipe with ``key.path=value`` settings (the CLI's ``--set``) applied.

        Values are YAML (``3``, ``true``, ``null``, ``[Linear, Conv2d]``, ``2:4``). Override entries
        are addressed as ``layers.<module name or re:pattern>.<key path>``, e.g.
        ``layers.features.3.conv.quantization.num_bits=8``; ``quantization=null`` removes a section.
        """
        if isinstance(items, str):
            items = [items]
        patch: Dict[str, Any] = {}
        for item in items:
            if not isinstance(item, str) or "=" not in item:
                raise _fail(f"--set {item!r}: expected key.path=value")
            key, _, raw = item.partition("=")
            key = key.strip()
            tokens = key.split(".")
            if tokens[0] == "layers" and len(tokens) > 1:
                # Module names and patterns contain dots: the name runs up to the first override key.
                rest = tokens[1:]
                cut = next((i for i in range(1, len(rest)) if rest[i] in _OVERRIDE_KEYS), None)
                if cut is None:  # a misspelt key should be reported as one, not read as part of the name
                    cut = next((i for i in range(1, len(rest))
                                if difflib.get_close_matches(rest[i], _OVERRIDE_KEYS, n=1, cutoff=0.8)), len(rest))
                tokens = ["layers", ".".join(rest[:cut])] + rest[cut:]
            if any(t == "" for t in tokens):
                raise _fail(f"--set {item!r}: empty key path")
            value = _load_yaml(raw, f"--set {item!r}")
            node = patch
            for i, t in enumerate(tokens[:-1]):
                nxt = node.get(t)
                if not isinstance(nxt, dict):
                    if nxt is not None:
                        raise _fail(f"--set {item!r}: {'.'.join(tokens[:i + 1])} was set to a value above")
                    nxt = node[t] = {}
                node = nxt
            node[tokens[-1]] = value
        return Recipe.from_dict(_merge(self.to_dict(), patch))

    # ---- resolution --------------------------------------------------------------------

    def selects(self, name: str, class_name: Any) -> bool:
        """Whether ``targets`` / ``ignore`` select the layer (``class_name``: str, class or module)."""
        cls_name = _class_name(class_name)
        if self.targets is not None and not any(selector_matches(t, name, cls_name) for t in self.targets):
            return False
        return not any(selector_matches(t, name, cls_name) for t in self.ignore)

    def matching_overrides(self, name: str) -> List[str]:
        """The override keys that apply to ``name``, in the order they are applied (last wins):
        "re:" patterns in recipe order, then the exact name."""
        pats = [k for k in self.layers if k.startswith("re:") and selector_matches(k, name, None)]
        return pats + ([name] if name in self.layers else [])

    def for_layer(self, name: str, class_name: Any) -> Optional[LayerScheme]:
        """The resolved settings for layer ``name`` of class ``class_name``.

        None when the layer is not selected (not in ``targets`` or in ``ignore``) or when, after its
        overrides, nothing is left to do to it (no quantization and no pruning).
        """
        if not self.selects(name, class_name):
            return None
        keys = self.matching_overrides(name)
        if not keys:
            scheme = self._base
        else:
            merged = self._base_dict()
            for k in keys:
                merged = _merge(merged, self.layers[k])
            which = ", ".join(repr(k) for k in keys)
            scheme = _scheme_from_dict(merged, f"layer {name!r} (overrides {which}): ")
        return scheme if scheme.compresses else None

    def unused_overrides(self, layer_names: Iterable[str]) -> List[str]:
        """Override keys (``layers`` entries) that match none of ``layer_names``.

        Pass the names of the layers the recipe selects (see ``selects``), so that an override for a
        layer that ``targets`` / ``ignore`` leave out also counts as unused.
        """
        names = list(layer_names)
        return [k for k in self.layers if not any(selector_matches(k, n, None) for n in names)]

    def _base_dict(self) -> Dict[str, Any]:
        return {
            "solver": self.solver,
            "damp": self.damp,
            "quantization": None if self.quantization is None else self.quantization.to_dict(),
            "sparsity": None if self.sparsity is None else self.sparsity.to_dict(),
        }


def _class_name(c: Any) -> Optional[str]:
    if c is None or isinstance(c, str):
        return c
    return c.__name__ if isinstance(c, type) else type(c).__name__


def _layers_values(d: Any, path: str) -> Dict[str, Dict[str, Any]]:
    d = _check_mapping(d, path)
    out: Dict[str, Dict[str, Any]] = {}
    for k, v in d.items():
        key = _name(k, f"{path} key {k!r}")
        where = f"{path}.{key}"
        if key in out:
            raise _fail(f"{where} is given twice")
        v = _check_mapping(v, where)
        _check_keys(v, _OVERRIDE_KEYS, where)
        out[key] = copy.deepcopy(dict(v))
    return out
