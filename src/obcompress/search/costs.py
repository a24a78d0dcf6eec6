"""Cost models of a layer variant: size on disk, BOPs, FLOPs (as MACs) and measured CPU latency.

Every cost model is a small object with ``name``, ``unit``, ``cost(geom, variant)`` (by calling it),
``dense(geom)`` (the uncompressed layer, the same as ``cost(geom, Variant())``) and ``to_dict()``;
``make_cost(name, **settings)`` and ``cost_from_dict(d)`` build one. A cost is additive over layers:
``model_totals`` sums a per-layer choice and ``dense_total`` the dense model, which is how the
searches compare a configuration against a budget.

Only the compressible layers' weights are costed. A model's real total adds whatever no variant
changes: biases (always stored as float32), normalisation and other parameters and buffers, layers
outside the search, and for sizes the safetensors header and the artifact's JSON files.

What each model counts:

- ``size`` (bit): the bits ``formats.save`` writes for the layer's weight (see ``SizeCost``).
- ``bops`` (bit-op): MACs x density x weight bits x activation bits (see ``BopsCost``).
- ``flops`` (MAC): dense-equivalent multiply-accumulates per sample x density. One MAC is one
  multiply and one add; double it for a count of floating-point operations.
- ``latency`` (s): the median time of one forward of the layer on this CPU with the fastest kernel
  that can execute the variant (see ``LatencyCost``).
"""

from __future__ import annotations

import inspect
import json
import math
import numbers
import os
import platform
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from ..checks import check_bool, check_group_size, check_int
from ..files import write_json
from ..formats.onnx_runtime import onnx_layer_latency
from ..geometry import LayerGeometry, check_geometry, kernel_shape, output_shape
from ..solvers import num_pruned, parse_mask_structure
from ..timing import median_seconds
from .space import Variant

__all__ = [
    "BopsCost",
    "COSTS",
    "CostModel",
    "FlopsCost",
    "LatencyCost",
    "SizeCost",
    "cost_from_dict",
    "dense_total",
    "kept_weights",
    "make_cost",
    "model_totals",
]



# ---------------------------------------------------------------------------------------------
# checks shared by every model


def _int_setting(cost: str, key: str, value: Any, lo: int = 1) -> int:
    return check_int(value, f"{cost} cost: {key}", lo)


def _check_pair(geom: Any, variant: Any) -> Tuple[LayerGeometry, Variant]:
    geom = check_geometry(geom)
    if not isinstance(variant, Variant):
        raise ValueError(f"layer {geom.name!r}: a cost needs a Variant, got {type(variant).__name__}")
    if not variant.fits(geom.cols):
        raise ValueError(f"layer {geom.name!r}: variant {variant.key} does not fit its {geom.cols} columns per group")
    return geom, variant


def kept_weights(geom: LayerGeometry, variant: Variant) -> int:
    """How many weights the variant keeps, counted as ``compress`` prunes them.

    ExactOBS removes ``num_pruned(sparsity, units)`` units per (conv group of a) layer, a unit
    being one weight, or c weights of a row for ``block:c``; N:M removes exactly (M - N) of every M.
    """
    geom, variant = _check_pair(geom, variant)
    per_group = geom.rows * geom.cols
    if not variant.pruned:
        return geom.weights
    ms = parse_mask_structure(variant.structure, geom.cols)
    if ms.kind == "nm":
        pruned = per_group // ms.m * (ms.m - ms.n)
    else:
        unit = ms.block if ms.kind == "block" else 1
        pruned = unit * num_pruned(variant.sparsity, per_group // unit)
    return geom.groups * (per_group - pruned)


class CostModel:
    """Base of the cost models: ``cost(geom, variant)`` by calling, ``dense(geom)``, ``to_dict()``."""

    name: str = ""
    unit: str = ""

    def __call__(self, geom: LayerGeometry, variant: Variant) -> float:
        raise NotImplementedError

    def dense(self, geom: LayerGeometry) -> float:
        return self(geom, Variant())

    def settings(self) -> Dict[str, Any]:
        return {}

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, **self.settings()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.settings().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and other.to_dict() == self.to_dict()

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))


# ---------------------------------------------------------------------------------------------
# size


def _packed_bytes(count: int, bits: int) -> int:
    # formats.packing.packed_size, without its argument checks (bits may be 1 for the mask here)
    return math.ceil(count * bits / 8)


class SizeCost(CostModel):
    """Bits that ``formats.save`` writes for the layer's weight in this variant.

    Mirrors ``formats.artifact._encode_layer`` (N = groups x rows x cols weights, K kept):

    - float (no bits): float32 values, all N (4N bytes), or a bitmask of ceil(N/8) bytes plus the K
      kept values (4K bytes) where that is strictly smaller. The dense variant is the weight the
      artifact stores as an ordinary float32 tensor: 4N bytes as well.
    - quantized: codes bit-packed at the variant's width, ceil(N*b/8) bytes, or a bitmask plus the
      kept codes, ceil(N/8) + ceil(K*b/8), where strictly smaller (only pruned variants have a
      mask); plus one scale per (conv group, row, quantization group) as float32, plus zero points.
      A symmetric grid's zero points are all 2^(b-1), stored once as one uint8 byte; an asymmetric
      grid's are one uint8 per scale.

    Two data-dependent narrowings of ``save`` are not predicted, so the cost is an upper bound
    there: scales are written as float16 when the float16-rounded scales decode to the very same
    weights (a fitted min-max grid practically never allows it: scales are arbitrary float32), and
    asymmetric zero points that happen to be all equal are stored once.

    Settings: ``symmetric`` grid; ``strategy`` "channel" (one scale per row, the search's grids),
    "tensor" (one per conv group) or "group" with ``group_size`` columns per scale.
    """

    name = "size"
    unit = "bit"

    def __init__(self, symmetric: bool = True, strategy: str = "channel", group_size: Optional[int] = None):
        check_bool(symmetric, "size cost: symmetric")
        if strategy not in ("channel", "tensor", "group"):
            raise ValueError(f"size cost: strategy must be 'channel', 'tensor' or 'group', got {strategy!r}")
        if strategy == "group":
            group_size = check_group_size(group_size, "size cost: group_size", "size cost: strategy")
        elif group_size is not None:
            raise ValueError(f"size cost: group_size is only meaningful with strategy 'group', got {group_size!r}")
        self.symmetric, self.strategy, self.group_size = symmetric, strategy, group_size

    def settings(self) -> Dict[str, Any]:
        return {"symmetric": self.symmetric, "strategy": self.strategy, "group_size": self.group_size}

    def tensor_bytes(self, geom: LayerGeometry, variant: Variant) -> Dict[str, int]:
        """Bytes of each tensor the artifact writes for the weight, under the part names ``save``
        uses (``layer::<name>::<part>``): values | mask + values | codes (+ mask) + scale + zero."""
        geom, variant = _check_pair(geom, variant)
        N = geom.weights
        K = kept_weights(geom, variant)
        mask = _packed_bytes(N, 1)
        if variant.bits is None:
            if variant.pruned and mask + 4 * K < 4 * N:
                return {"mask": mask, "values": 4 * K}
            return {"values": 4 * N}
        b = variant.bits
        if variant.pruned and mask + _packed_bytes(K, b) < _packed_bytes(N, b):
            out = {"mask": mask, "codes": _packed_bytes(K, b)}
        else:
            out = {"codes": _packed_bytes(N, b)}
        rows = 1 if self.strategy == "tensor" else geom.rows
        col_groups = math.ceil(geom.cols / self.group_size) if self.strategy == "group" else 1
        n_scales = geom.groups * rows * col_groups
        out["scale"] = 4 * n_scales
        out["zero"] = 1 if self.symmetric else n_scales
        return out

    def __call__(self, geom: LayerGeometry, variant: Variant) -> float:
        return float(8 * sum(self.tensor_bytes(geom, variant).values()))


# ---------------------------------------------------------------------------------------------
# arithmetic


class BopsCost(CostModel):
    """Bit operations per sample: MACs x density x weight bits x activation bits.

    A quantized variant multiplies ``bits``-bit weights by ``activation_bits``-bit activations; a
    float variant runs in float, ``float_bits`` x ``float_bits`` per MAC. The dense reference is
    therefore ``float_bits``^2 per MAC, 16 x 16 by default: the fp16 GPU setting the OBC paper
    measures BOPs reductions against. As in the paper, pruned MACs are skipped, whatever the
    sparsity pattern (unstructured, N:M or blocks): density scales every variant.
    """

    name = "bops"
    unit = "bit-op"

    def __init__(self, activation_bits: int = 8, float_bits: int = 16):
        self.activation_bits = _int_setting("bops", "activation_bits", activation_bits)
        self.float_bits = _int_setting("bops", "float_bits", float_bits)

    def settings(self) -> Dict[str, Any]:
        return {"activation_bits": self.activation_bits, "float_bits": self.float_bits}

    def __call__(self, geom: LayerGeometry, variant: Variant) -> float:
        geom, variant = _check_pair(geom, variant)
        if variant.bits is None:
            wb, ab = self.float_bits, self.float_bits
        else:
            wb, ab = variant.bits, self.activation_bits
        return float(geom.macs * _density(geom, variant) * wb * ab)


class FlopsCost(CostModel):
    """Multiply-accumulates per sample, pruned ones skipped: dense MACs x density (unit: MAC; one
    MAC is two floating-point operations). Bits do not change it."""

    name = "flops"
    unit = "MAC"

    def __init__(self):
        pass

    def __call__(self, geom: LayerGeometry, variant: Variant) -> float:
        geom, variant = _check_pair(geom, variant)
        return float(geom.macs * _density(geom, variant))


def _density(geom: LayerGeometry, variant: Variant) -> float:
    # The weights compress really keeps, not the nominal level: the two differ by the count's
    # rounding, and the size cost counts the same weights.
    return kept_weights(geom, variant) / geom.weights


# ---------------------------------------------------------------------------------------------
# latency

_CACHE_FORMAT = "obcompress-latency-cache"
_CACHE_VERSION = 1
KERNELS = ("dense", "csr", "int8")


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return cpu


def _machine() -> str:
    """What the measurements depend on: the CPU model and the torch build."""
    return f"{cpu_model()} / torch {torch.__version__}"


def _quantized_engine() -> Optional[str]:
    engines = list(torch.backends.quantized.supported_engines)
    current = torch.backends.quantized.engine
    order = [current] + [e for e in ("fbgemm", "x86", "qnnpack", "onednn") if e != current]
    return next((e for e in order if e in engines and e != "none"), None)


class _Bench:
    """Inputs of one layer geometry at one batch size and the kernels that run on them.

    Every kernel computes the same layer on the same input, so their times compare: dense is the
    layer's own conv or linear; csr and int8 are matrix products on the im2col (unfolded) input,
    whose unfolding they pay for inside the timed call, as a real sparse or int8 conv would.
    """

    def __init__(self, geom: LayerGeometry, batch: int):
        self.geom = geom
        gen = torch.Generator().manual_seed(0)
        G, R, C = geom.groups, geom.rows, geom.cols
        self.spatial = output_shape(geom)
        if geom.kind in ("linear", "conv1d_hf"):
            self.x = torch.randn(batch * self.spatial[0], C, generator=gen)
            self.weight = torch.randn(G * R, C, generator=gen)
            return
        ks = kernel_shape(geom)
        cin = G * (C // geom.taps)
        self.kernel = (1,) * (2 - len(ks)) + ks  # conv1d runs as a 1 x k conv2d for unfold
        self.weight = torch.randn(G * R, C // geom.taps, *ks, generator=gen)
        # "same" padding, done once up front (even kernels pad one more at the end), so that every
        # kernel sees the same padded input and gives exactly the spatial size recorded.
        pads: List[int] = []
        for k in reversed(ks):
            pads += [(k - 1) // 2, k // 2]
        self.x = F.pad(torch.randn(batch, cin, *self.spatial, generator=gen), pads)

    @property
    def positions(self) -> int:
        return math.prod(self.spatial)

    def _unfolded(self) -> torch.Tensor:
        """(batch, groups*cols, positions): im2col with PyTorch's (channel, tap) column order, so
        that group g's columns are the consecutive block [g*cols, (g+1)*cols)."""
        x = self.x if self.geom.kind == "conv2d" else self.x.unsqueeze(2)
        return F.unfold(x, self.kernel)

    def dense(self) -> Callable[[], torch.Tensor]:
        geom, x, w = self.geom, self.x, self.weight
        if geom.kind in ("linear", "conv1d_hf"):
            return lambda: F.linear(x, w)
        conv = F.conv2d if geom.kind == "conv2d" else F.conv1d
        return lambda: conv(x, w, groups=geom.groups)

    def csr(self, density: float) -> Callable[[], torch.Tensor]:
        geom = self.geom
        G, R, C = geom.groups, geom.rows, geom.cols
        gen = torch.Generator().manual_seed(1)
        n = G * R * C
        keep = torch.zeros(n, dtype=torch.bool)
        keep[torch.randperm(n, generator=gen)[: round(density * n)]] = True
        g, r, c = keep.reshape(G, R, C).nonzero(as_tuple=True)
        vals = self.weight.reshape(G, R, C)[g, r, c]
        # One block-diagonal matrix holds every conv group: one sparse product instead of a Python
        # loop over (possibly hundreds of depthwise) groups, with the same non-zeros.
        idx = torch.stack([g * R + r, g * C + c])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
            W = torch.sparse_coo_tensor(idx, vals, (G * R, G * C)).coalesce().to_sparse_csr()
        if geom.kind in ("linear", "conv1d_hf"):
            xt = self.x.t().contiguous()  # (features, tokens): the layout a sparse linear consumes
            return lambda: W @ xt
        B = self.x.shape[0]

        def run():
            U = self._unfolded()
            U = U[0] if B == 1 else U.transpose(0, 1).reshape(U.shape[1], -1)
            return W @ U

        return run

    def int8(self) -> Optional[Callable[[], torch.Tensor]]:
        """torch's dynamic int8 linear (int8 weights per row, activations quantized per call);
        None where it cannot run: grouped convs (no grouped int8 linear exists) or no engine.

        Activations are quantized to 7 bits (``reduce_range``, as torch's own dynamic Linear does on
        x86): fbgemm's u8s8 kernel sums pairs of products in int16 with saturation on CPUs with AVX2
        but without VNNI, and would compute another layer there; the timing is the same kernel."""
        geom = self.geom
        if geom.groups != 1:
            return None
        engine = _quantized_engine()
        if engine is None:
            return None
        w2 = self.weight.reshape(geom.rows, geom.cols)
        scale = (w2.abs().amax(1) / 127).clamp_min(1e-8).double()
        previous = torch.backends.quantized.engine
        try:
            torch.backends.quantized.engine = engine
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # quantized tensor creation is marked deprecated
                qw = torch.quantize_per_channel(w2, scale, torch.zeros(geom.rows, dtype=torch.long), 0, torch.qint8)
                packed = torch.ops.quantized.linear_prepack(qw, None)
        except RuntimeError:
            return None
        finally:
            torch.backends.quantized.engine = previous
        if geom.kind in ("linear", "conv1d_hf"):
            x = self.x
            return lambda: torch.ops.quantized.linear_dynamic(x, packed, reduce_range=True)

        def run():
            U = self._unfolded()
            return torch.ops.quantized.linear_dynamic(U.transpose(1, 2).reshape(-1, U.shape[1]), packed, reduce_range=True)

        return run


class LatencyCost(CostModel):
    """Measured seconds of one forward of the layer variant on this CPU (``batch`` samples).

    Kernels (each times the layer on the same input, built from the geometry: a linear gets
    round(positions) tokens, a conv stride 1, "same" padding and the square (or 1-D) spatial size
    nearest to ``positions``, recorded in the cache entry):

    - ``dense``: float32 ``F.linear`` / ``F.conv2d`` / ``F.conv1d``; runs every variant.
    - ``csr``: torch's sparse CSR matrix product of the weight, at the variant's density (rounded
      to 2 decimals), with the im2col input; runs every pruned variant whatever its pattern.
    - ``int8``: torch's dynamic int8 quantized linear on the im2col input; runs every quantized
      variant (bits <= 8) of an ungrouped layer, at full density (it cannot skip zeros).

    A variant's latency is the least over the kernels that run it. Each measurement is the median
    of ``repeats`` timings after ``warmup`` calls (a timing loops the kernel until it spans about a
    millisecond), taken with ``threads`` torch threads (None: the current setting; torch's thread
    count is process-wide, so it is set for the measurement and restored after), and is cached
    in memory and, with ``cache_path``, in a JSON file that later runs read back. The key is
    (kind, groups, rows, cols, taps, positions, batch, threads, kernel, density); a file records the
    machine and torch version it was measured on and is refused on another.

    A model's latency is taken as the sum of its layers' (no overlap between layers). Times are
    noisy: compare variants measured in one session, on an otherwise quiet machine.
    """

    name = "latency"
    unit = "s"

    def __init__(self, batch: int = 1, threads: Optional[int] = None, repeats: int = 15, warmup: int = 3,
                 cache_path: Optional[Union[str, os.PathLike]] = None):
        self.batch = _int_setting("latency", "batch", batch)
        self.threads = None if threads is None else _int_setting("latency", "threads", threads)
        self.repeats = _int_setting("latency", "repeats", repeats)
        self.warmup = _int_setting("latency", "warmup", warmup, lo=0)
        if cache_path is not None and not isinstance(cache_path, (str, os.PathLike)):
            raise ValueError(f"latency cost: cache_path must be a path or None, got {cache_path!r}")
        self.cache_path = None if cache_path is None else Path(cache_path)
        self._entries: Dict[str, Dict[str, Any]] = {}
        self._unavailable: set = set()
        self.measurements = 0  # kernel timings this object ran (cache hits excluded)
        if self.cache_path is not None and self.cache_path.exists():
            self._entries.update(self._read_file())

    def settings(self) -> Dict[str, Any]:
        return {"batch": self.batch, "threads": self.threads, "repeats": self.repeats, "warmup": self.warmup,
                "cache_path": None if self.cache_path is None else str(self.cache_path)}

    # -- cache ------------------------------------------------------------------------------

    def _read_file(self) -> Dict[str, Dict[str, Any]]:
        path = self.cache_path
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"latency cache {path} cannot be read as JSON: {e}") from None
        if (not isinstance(data, dict) or data.get("format") != _CACHE_FORMAT
                or not isinstance(data.get("entries"), dict)):
            raise ValueError(f"latency cache {path} is not an obcompress latency cache")
        if data.get("version") != _CACHE_VERSION:
            raise ValueError(f"latency cache {path} has version {data.get('version')!r}; this obcompress reads "
                             f"version {_CACHE_VERSION}")
        machine = _machine()
        if data.get("machine") != machine:
            raise ValueError(f"latency cache {path} was measured on {data.get('machine')!r}, this is {machine!r}: "
                             "its times do not apply here; give another cache_path")
        for key, e in data["entries"].items():
            if not isinstance(e, dict) or not isinstance(e.get("seconds"), (int, float)) or not e["seconds"] > 0:
                raise ValueError(f"latency cache {path}: entry {key} is malformed")
        return data["entries"]

    def _write_file(self) -> None:
        path = self.cache_path
        entries = dict(self._read_file()) if path.exists() else {}
        # Entries another process wrote since we read the file are kept; ours win on a clash.
        entries.update(self._entries)
        body = {"format": _CACHE_FORMAT, "version": _CACHE_VERSION, "machine": _machine(), "entries": entries}
        write_json(path, body, indent=1, sort_keys=True)

    @property
    def cache(self) -> Dict[str, Dict[str, Any]]:
        """The measurements known to this object, by key (a JSON list, see ``key``)."""
        return {k: dict(v) for k, v in self._entries.items()}

    def _threads(self) -> int:
        return self.threads if self.threads is not None else torch.get_num_threads()

    def key(self, geom: LayerGeometry, kernel: str, density: float = 1.0) -> str:
        geom = check_geometry(geom)
        if kernel not in KERNELS:
            raise ValueError(f"unknown latency kernel {kernel!r} (expected one of {KERNELS})")
        return json.dumps([geom.kind, geom.groups, geom.rows, geom.cols, geom.taps, round(float(geom.positions), 4),
                           self.batch, self._threads(), kernel, round(float(density), 2)])

    # -- measuring --------------------------------------------------------------------------

    def kernels(self, geom: LayerGeometry, variant: Variant) -> List[Tuple[str, float]]:
        """(kernel, density) pairs that can execute the variant; dense first."""
        geom, variant = _check_pair(geom, variant)
        out = [("dense", 1.0)]
        if variant.pruned:
            out.append(("csr", max(0.01, round(_density(geom, variant), 2))))  # as ``measure`` times it
        if variant.bits is not None and geom.groups == 1:
            out.append(("int8", 1.0))
        return out

    def _time(self, fn: Callable[[], Any]) -> float:
        with torch.inference_mode():
            return median_seconds(fn, repeats=self.repeats, warmup=self.warmup)

    def measure(self, geom: LayerGeometry, kernel: str, density: float = 1.0) -> Optional[float]:
        """Seconds of one forward with ``kernel`` at ``density`` (cached); None where the kernel
        cannot run this layer (int8 on a grouped conv, or no quantized engine)."""
        if isinstance(density, bool) or not isinstance(density, numbers.Real) or not 0 < density <= 1:
            raise ValueError(f"layer {getattr(geom, 'name', geom)!r}: kernel density must be in (0, 1], "
                             f"got {density!r}")
        # Densities are timed at 2 decimals, and at 1 % at least (an empty matrix is no layer).
        density = max(0.01, round(float(density), 2))
        key = self.key(geom, kernel, density)
        if key in self._entries:
            return self._entries[key]["seconds"]
        if key in self._unavailable:
            return None
        bench = _Bench(geom, self.batch)
        fn = {"dense": bench.dense, "csr": lambda: bench.csr(density), "int8": bench.int8}[kernel]()
        if fn is None:
            self._unavailable.add(key)
            return None
        previous = torch.get_num_threads()
        try:
            if self.threads is not None:
                torch.set_num_threads(self.threads)
            seconds = self._time(fn)
        finally:
            torch.set_num_threads(previous)
        self.measurements += 1
        self._entries[key] = {"seconds": seconds, "spatial": list(bench.spatial), "positions": bench.positions}
        if self.cache_path is not None:
            self._write_file()
        return seconds

    def best(self, geom: LayerGeometry, variant: Variant) -> Tuple[str, float]:
        """The fastest kernel that executes the variant and its seconds."""
        timed = [(k, self.measure(geom, k, d)) for k, d in self.kernels(geom, variant)]
        return min(((k, s) for k, s in timed if s is not None), key=lambda ks: ks[1])

    def __call__(self, geom: LayerGeometry, variant: Variant) -> float:
        return float(self.best(geom, variant)[1])


# ---------------------------------------------------------------------------------------------
# registry and totals

COSTS: Dict[str, type] = {c.name: c for c in (SizeCost, BopsCost, FlopsCost, LatencyCost)}


def make_cost(name: str, **settings) -> CostModel:
    """The cost model called ``name`` ("size", "bops", "flops", "latency") with its settings."""
    cls = COSTS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown cost {name!r}; expected one of {sorted(COSTS)}")
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(settings) - set(allowed))
    if unknown:
        raise ValueError(f"{name} cost: unknown settings {unknown}; it takes {allowed or 'none'}")
    return cls(**settings)


def cost_from_dict(d: Mapping[str, Any]) -> CostModel:
    """Inverse of ``CostModel.to_dict``."""
    if not isinstance(d, Mapping) or "name" not in d:
        raise ValueError(f"a cost must be a mapping with a 'name', got {d!r}")
    settings = {k: v for k, v in d.items() if k != "name"}
    return make_cost(d["name"], **settings)


def _check_cost(cost: Any) -> CostModel:
    if not isinstance(cost, CostModel):
        raise ValueError(f"cost must be a cost model (see make_cost), got {type(cost).__name__}")
    return cost


def model_totals(cost: CostModel, geoms: Mapping[str, LayerGeometry], choice: Mapping[str, Variant]) -> float:
    """Sum of ``cost`` over the layers of ``geoms``, each in the variant ``choice`` gives it. Every
    layer needs a choice and every choice a layer (a partial configuration is not a model's cost)."""
    _check_cost(cost)
    missing = sorted(set(geoms) - set(choice))
    extra = sorted(set(choice) - set(geoms))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"no variant chosen for layers {missing[:5]}")
        if extra:
            parts.append(f"variants chosen for unknown layers {extra[:5]}")
        raise ValueError("; ".join(parts))
    return float(sum(cost(geoms[n], choice[n]) for n in geoms))


def dense_total(cost: CostModel, geoms: Mapping[str, LayerGeometry]) -> float:
    """Sum of ``cost`` over the layers of ``geoms``, all uncompressed."""
    _check_cost(cost)
    return float(sum(cost.dense(g) for g in geoms.values()))


# ---------------------------------------------------------------------------------------------
# onnxruntime latency


class OnnxLatencyCost(CostModel):
    """Measured seconds of one forward of the layer variant in onnxruntime (``batch`` samples), the
    layer built as ``formats.onnx_export.export_onnx`` writes it (see
    ``formats.onnx_runtime.onnx_layer_latency``).

    A quantized variant runs with int8 weights (int4 at <= 4 bits) behind DequantizeLinear, and
    with ``activation_bits`` also with Quantize/DequantizeLinear around the layer, so that
    onnxruntime may pick its integer kernels; a float variant runs as a float layer. onnxruntime's
    CPU kernels have no sparse path, so a pruned variant costs what the same variant unpruned does:
    measurements are keyed without the density (one per kind, shape, batch, threads, weight bits
    and activation bits), cached in memory. Times are noisy: compare variants measured in one
    session on an otherwise quiet machine.
    """

    name = "onnx_latency"
    unit = "s"

    def __init__(self, batch: int = 1, threads: int = 1, activation_bits: Optional[int] = None, repeats: int = 15,
                 warmup: int = 3):
        self.batch = _int_setting("onnx_latency", "batch", batch)
        self.threads = _int_setting("onnx_latency", "threads", threads)
        if activation_bits is not None:
            activation_bits = _int_setting("onnx_latency", "activation_bits", activation_bits, lo=2)
            if activation_bits > 8:
                raise ValueError(f"onnx_latency cost: activation_bits must be at most 8, got {activation_bits}")
        self.activation_bits = activation_bits
        self.repeats = _int_setting("onnx_latency", "repeats", repeats)
        self.warmup = _int_setting("onnx_latency", "warmup", warmup, lo=0)
        self._entries: Dict[str, float] = {}
        self.measurements = 0  # onnxruntime timings this object ran (cache hits excluded)

    def settings(self) -> Dict[str, Any]:
        return {"batch": self.batch, "threads": self.threads, "activation_bits": self.activation_bits,
                "repeats": self.repeats, "warmup": self.warmup}

    def key(self, geom: LayerGeometry, variant: Variant) -> str:
        geom, variant = _check_pair(geom, variant)
        return json.dumps([geom.kind, geom.groups, geom.rows, geom.cols, geom.taps, round(float(geom.positions), 4),
                           self.batch, self.threads, variant.bits,
                           self.activation_bits if variant.bits is not None else None])

    def __call__(self, geom: LayerGeometry, variant: Variant) -> float:
        key = self.key(geom, variant)
        if key not in self._entries:
            # The dense variant of the same layer: the zeros of a pruned one change no kernel.
            self._entries[key] = onnx_layer_latency(
                geom, variant.bits, activation_bits=self.activation_bits, batch=self.batch,
                threads=self.threads, repeats=self.repeats, warmup=self.warmup)
            self.measurements += 1
        return float(self._entries[key])


COSTS[OnnxLatencyCost.name] = OnnxLatencyCost
