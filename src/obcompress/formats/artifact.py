"""The compressed-model artifact: a directory that is really as small as the compression claims.

Layout of ``save(model, result, directory)``::

    model.safetensors        every tensor the model needs, nothing pickled
    compression_config.json  format version, per-layer storage and byte counts, the weights file's
                             size and SHA-256 (how ``load`` tells a truncated or damaged file)
    recipe.yaml              the recipe that produced it
    report.json              the per-layer report and the bytes on disk next to fp32

A compressed layer's weight is not stored as floats. A quantized layer keeps its integer codes,
bit-packed at the grid's width (``packing.pack_bits``), plus the grid's scale and zero point per
(conv group, row, quantization group), plus the group index of each column when GPTQ's act-order
formed groups out of column order. Scales are float16 where that decodes to the very same weights,
else float32; zero points take the narrowest exact form (one value for a symmetric layer, uint8
for integer ones). A pruned layer also keeps a bitmask, and then only the codes
(or, unquantized, the values) of its kept weights: ``bitmask + kept`` or ``all`` is chosen per
layer, whichever is smaller. Every other parameter and buffer is stored as it is.

``load`` rebuilds each weight with the same float32 arithmetic as ``QuantGrid.decode`` and cast to
the weight's dtype, which is how ``compress`` wrote it into the model; ``save`` runs that very
reconstruction and refuses to write an artifact that would not load back bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from ..files import atomic_directory
from ..model.activations import attach, quantizers_from_dict, quantizers_to_dict
from ..model.layers import LayerInfo, find_layers, weight_groups
from ..solvers.grid import QuantGrid
from .packing import pack_bits, pack_mask, packed_size, unpack_bits, unpack_mask

__all__ = [
    "CONFIG_FILE",
    "FORMAT_VERSION",
    "RECIPE_FILE",
    "REPORT_FILE",
    "StoredLayer",
    "WEIGHTS_FILE",
    "artifact_size",
    "column_groups",
    "decode_codes",
    "fp32_size",
    "load",
    "read_config",
    "read_layers",
    "save",
]

FORMAT = "obcompress-artifact"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "compression_config.json"
RECIPE_FILE = "recipe.yaml"
REPORT_FILE = "report.json"

_DTYPES = {
    "float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
    "bool": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}

# Storage kinds of a compressed layer's weight.
CODES, MASK_CODES, VALUES, MASK_VALUES = "codes", "bitmask+codes", "values", "bitmask+values"


# ---------------------------------------------------------------------------------------------
# sizes


def artifact_size(directory: Union[str, os.PathLike]) -> int:
    """Bytes on disk of the artifact's files (the sum of their sizes)."""
    d = Path(directory)
    if not d.is_dir():
        raise ValueError(f"artifact directory not found: {d}")
    return sum(p.stat().st_size for p in d.iterdir() if p.is_file())


def _storage_key(t: torch.Tensor):
    # Tied tensors (one Parameter under two names) share storage, offset, shape and stride; empty
    # tensors have no storage to compare, so they never count as tied.
    if t.numel() == 0:
        return None
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def fp32_size(model: nn.Module) -> int:
    """Bytes of the model's state at 4 bytes per floating-point element (integer buffers at their own
    width), each tied tensor counted once: the size an uncompressed fp32 checkpoint would have."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    seen = set()
    total = 0
    for t in model.state_dict().values():
        key = _storage_key(t)
        if key is not None:
            if key in seen:
                continue
            seen.add(key)
        total += t.numel() * (4 if t.is_floating_point() else t.element_size())
    return total


# ---------------------------------------------------------------------------------------------
# weight layout and reconstruction


def _to_module_layout(info_kind: str, W: torch.Tensor, shape: Tuple[int, ...]) -> torch.Tensor:
    """Inverse of ``weight_groups``: (groups, rows, cols) back to the module's weight shape."""
    if info_kind == "conv1d_hf":
        return W[0].t().contiguous()
    return W.reshape(shape).contiguous()


def column_groups(G: int, C: int, strategy: str, group_size: Optional[int], g_idx: Optional[torch.Tensor]):
    """(G, C): the quantization group (index into the scale's last dimension) of every column."""
    if g_idx is not None:
        return g_idx.to(torch.long)
    c = torch.arange(C)
    col = c // group_size if strategy == "group" else torch.zeros_like(c)
    return col.expand(G, C)


def decode_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, col_groups: torch.Tensor,
                 mask: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Weights (G, R, C) from codes (G, R, C): ``scale * (code - zero)`` in float32 exactly as
    ``QuantGrid.decode``, zero where pruned, cast to the weight dtype as ``set_weight_groups`` does."""
    G, R, C = codes.shape
    ng = scale.shape[-1]
    idx = col_groups[:, None, :].expand(G, R, C)
    # scale is (G, 1, groups) for the tensor strategy and (G, R, groups) otherwise; zero has its
    # shape or is one value for the whole layer (see _narrow_zero).
    s = torch.gather(scale.to(torch.float32).expand(G, R, ng), 2, idx)
    z = torch.gather(zero.to(torch.float32).expand(G, R, ng), 2, idx)
    W = s * (codes.to(torch.float32) - z)
    if mask is not None:
        W = torch.where(mask, W, torch.zeros((), dtype=W.dtype))
    return W.to(dtype)


def _check_grids(name: str, grids: List[Optional[QuantGrid]], G: int) -> Optional[List[QuantGrid]]:
    if len(grids) != G:
        raise ValueError(f"layer {name!r}: the result has {len(grids)} grids for {G} groups")
    if all(g is None for g in grids):
        return None
    if not all(isinstance(g, QuantGrid) for g in grids):
        raise ValueError(f"layer {name!r}: some groups are quantized and others not; an artifact needs all or none")
    first = grids[0]
    for g in grids[1:]:
        same = (g.bits, g.symmetric, g.strategy, g.group_size, tuple(g.scale.shape)) == (
            first.bits, first.symmetric, first.strategy, first.group_size, tuple(first.scale.shape))
        if not same:
            raise ValueError(f"layer {name!r}: its groups have different grid settings; an artifact needs one per layer")
    if not 2 <= first.bits <= 8:
        raise ValueError(f"layer {name!r}: {first.bits}-bit grid; artifacts store 2..8 bits")
    return [g.to("cpu") for g in grids]


def _narrow_zero(zero: torch.Tensor) -> torch.Tensor:
    """The zero points in the fewest bytes that hold them exactly (as float32 values).

    Symmetric grids put every zero point at 2^(bits-1), so one value serves the whole layer; an
    asymmetric grid's zero points are integers in 0..2^bits-1, which uint8 holds exactly. float16
    and float32 are the fall-backs for zero points that are neither.
    """
    z32 = zero.to(torch.float32)
    if z32.numel() and (z32 == z32.reshape(-1)[0]).all():
        z32 = z32.reshape(-1)[:1].reshape(1, 1, 1)
    for dt in (torch.uint8, torch.float16):
        cand = z32.to(dt)
        if torch.equal(cand.to(torch.float32), z32) and (dt != torch.uint8 or ((z32 >= 0) & (z32 <= 255)).all()):
            return cand
    return z32


def _index_dtype(n_groups: int) -> torch.dtype:
    # The group index of every column is as large as a row of 8-bit codes when stored as int32;
    # the smallest type that holds the group count keeps it a small share of the layer.
    if n_groups <= 256:
        return torch.uint8
    if n_groups <= 32767:
        return torch.int16
    return torch.int32


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _encode_layer(name: str, info: LayerInfo, state) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """Config entry and tensors (keys relative to the layer) of one compressed layer."""
    # in the weight's own dtype, so that float64 or other weights are compared exactly
    target = weight_groups(info, dtype=None).cpu()
    G, R, C = target.shape
    N = target.numel()
    dtype = target.dtype
    mask = state.mask
    if mask is not None:
        mask = mask.detach().to("cpu", torch.bool)
        if tuple(mask.shape) != (G, R, C):
            raise ValueError(f"layer {name!r}: mask has shape {tuple(mask.shape)}, the weight is {(G, R, C)}")
        if (target[~mask] != 0).any():
            raise ValueError(f"layer {name!r}: weights that its mask prunes are not zero; "
                             "was the model changed after compress()?")
    kept = N if mask is None else int(mask.sum())
    scheme = state.scheme
    entry: Dict[str, Any] = {
        "kind": info.kind,
        "module": type(info.module).__name__,
        "weight_shape": list(info.module.weight.shape),
        "dtype": _DTYPE_NAMES.get(dtype, str(dtype)),
        "groups": G, "rows": R, "cols": C,
        "method": getattr(scheme, "solver", None),
        "mask_structure": None if mask is None or getattr(scheme, "sparsity", None) is None
        else scheme.sparsity.mask_structure,
        "sparsity": 1.0 - kept / N,
        "kept": kept,
        "fp32_bytes": 4 * N,
    }
    if dtype not in _DTYPE_NAMES or not dtype.is_floating_point:
        raise ValueError(f"layer {name!r}: weight dtype {dtype} cannot be stored")
    grids = _check_grids(name, list(state.grids), G)
    tensors: Dict[str, torch.Tensor] = {}

    if grids is None:
        entry["quantization"] = None
        dense_bytes = N * target.element_size()
        sparse_bytes = None if mask is None else math.ceil(N / 8) + kept * target.element_size()
        if sparse_bytes is not None and sparse_bytes < dense_bytes:
            entry["storage"] = MASK_VALUES
            tensors["mask"] = pack_mask(mask)
            tensors["values"] = target[mask].contiguous()
        else:
            entry["storage"] = VALUES
            tensors["values"] = target.reshape(-1).contiguous()
    else:
        g0 = grids[0]
        codes = torch.stack([grids[g].encode(target[g].to(torch.float32)) for g in range(G)])
        scale = torch.stack([g.scale for g in grids])
        zero = torch.stack([g.zero for g in grids])
        n_groups = scale.shape[-1]
        g_idx = None
        if any(g.g_idx is not None for g in grids):
            g_idx = torch.stack([g.column_groups(C, device="cpu") for g in grids]).to(_index_dtype(n_groups))
        col = column_groups(G, C, g0.strategy, g0.group_size, g_idx)
        dense_bytes = packed_size(N, g0.bits)
        sparse_bytes = None if mask is None else math.ceil(N / 8) + packed_size(kept, g0.bits)
        storages = [(dense_bytes, CODES)]
        if sparse_bytes is not None:
            storages.append((sparse_bytes, MASK_CODES))
        storages.sort(key=lambda x: x[0])
        z = _narrow_zero(zero)
        chosen = None
        # Smallest storage first, then float16 scales where they still decode to exactly the weights
        # the model holds (float32 otherwise); only what passes this check is written. Dense codes
        # can fail it where sparse ones pass: a pruned weight is zero, which only the mask guarantees
        # when the zero point is not an integer.
        for _, storage in storages:
            use_mask = mask if storage == MASK_CODES else None
            for sd in (torch.float16, torch.float32):
                s = scale.to(sd)
                if s.to(torch.float32).isfinite().all() and torch.equal(
                        decode_codes(codes, s, z, col, use_mask, dtype), target):
                    chosen = (storage, s, z)
                    break
            if chosen:
                break
        if chosen is None:
            raise ValueError(f"layer {name!r}: its weights are not on the grid the result recorded for it; "
                             "was the model changed after compress()?")
        storage, s, z = chosen
        entry["storage"] = storage
        if storage == MASK_CODES:
            tensors["mask"] = pack_mask(mask)
            tensors["codes"] = pack_bits(codes[mask], g0.bits)
        else:
            tensors["codes"] = pack_bits(codes, g0.bits)
        tensors["scale"] = s.contiguous()
        tensors["zero"] = z.contiguous()
        if g_idx is not None:
            tensors["g_idx"] = g_idx.contiguous()
        entry["quantization"] = {
            "bits": g0.bits,
            "symmetric": bool(g0.symmetric),
            "strategy": g0.strategy,
            "group_size": g0.group_size,
            "mse": bool(g0.mse),
            "act_order_groups": g_idx is not None,
            "scale_shape": list(scale.shape),
            "scale_dtype": _DTYPE_NAMES[s.dtype],
            "zero_dtype": _DTYPE_NAMES[z.dtype],
            "zero_shape": list(z.shape),
        }
    entry["bytes"] = {k: _nbytes(v) for k, v in tensors.items()}
    entry["bytes"]["total"] = sum(entry["bytes"].values())
    return entry, tensors


def _layer_key(name: str, part: str) -> str:
    return f"layer::{name}::{part}"


def _state_key(key: str) -> str:
    return f"state::{key}"


# ---------------------------------------------------------------------------------------------
# save


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode("utf-8")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save(model: nn.Module, result, directory: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Write the artifact of ``model`` as ``compress`` left it (``result`` = its return value).

    The directory appears complete or not at all: everything is written into a temporary sibling
    directory that then replaces ``directory``. An existing ``directory`` is replaced only when it
    is empty or an obcompress artifact. Returns the written ``compression_config.json`` content.
    """
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    states = getattr(result, "states", None)
    if not isinstance(states, dict) or not hasattr(result, "recipe"):
        raise ValueError(f"result must be the Result that compress() returned, got {type(result).__name__}")
    if not states:
        raise ValueError("result has no compressed layer to save")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory} exists and is not a directory")
    if directory.is_dir() and any(directory.iterdir()) and not (directory / CONFIG_FILE).is_file():
        raise ValueError(f"{directory} is a non-empty directory that is not an obcompress artifact; "
                         "refusing to replace it")

    found = find_layers(model)
    sd = model.state_dict()
    tensors: Dict[str, torch.Tensor] = {}
    layers: Dict[str, Any] = {}
    canonical: Dict[Any, str] = {}  # storage identity -> the state key that holds it
    for name, state in states.items():
        info = found.get(name)
        if info is None:
            raise ValueError(f"result names layer {name!r}, which is not a compressible layer of this model")
        recorded = getattr(state, "info", None)
        if recorded is not None and (recorded.groups, recorded.rows, recorded.cols) != (info.groups, info.rows, info.cols):
            raise ValueError(f"layer {name!r}: the model's layer is {(info.groups, info.rows, info.cols)}, the "
                             f"result's is {(recorded.groups, recorded.rows, recorded.cols)}")
        wkey = f"{name}.weight" if name else "weight"
        if wkey not in sd:
            raise ValueError(f"layer {name!r}: its weight is not in the model's state_dict as {wkey!r}")
        entry, parts = _encode_layer(name, info, state)
        entry["state_key"] = wkey
        layers[name] = entry
        for part, t in parts.items():
            tensors[_layer_key(name, part)] = t
        key = _storage_key(sd[wkey])
        if key is not None:
            canonical.setdefault(key, wkey)

    compressed_keys = {e["state_key"] for e in layers.values()}
    state_entries: Dict[str, Any] = {}
    aliases: Dict[str, str] = {}
    for key, t in sd.items():
        if key in compressed_keys:
            continue
        if _DTYPE_NAMES.get(t.dtype) is None:
            raise ValueError(f"state entry {key!r} has dtype {t.dtype}, which the artifact cannot store")
        ident = _storage_key(t)
        if ident is not None and ident in canonical:
            aliases[key] = canonical[ident]
            continue
        if ident is not None:
            canonical[ident] = key
        tensors[_state_key(key)] = t.detach().cpu().contiguous().clone()
        state_entries[key] = {"shape": list(t.shape), "dtype": _DTYPE_NAMES[t.dtype]}

    fp32 = fp32_size(model)
    config: Dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "layers": layers,
        "state": state_entries,
        "aliases": aliases,
        "fp32_bytes": fp32,
        # W+A: the per-tensor input quantizers, re-attached as forward pre-hooks by load().
        "activation_quantizers": quantizers_to_dict(getattr(result, "activation_quantizers", {}) or {}),
    }

    with atomic_directory(directory) as tmp:
        weights = tmp / WEIGHTS_FILE
        save_file(tensors, str(weights), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
        config["files"] = {WEIGHTS_FILE: {"bytes": weights.stat().st_size, "sha256": _sha256(weights)}}
        config["weights_bytes"] = weights.stat().st_size
        config_bytes = _json_bytes(config)
        (tmp / CONFIG_FILE).write_bytes(config_bytes)
        (tmp / RECIPE_FILE).write_text(result.recipe.to_yaml(), encoding="utf-8")
        report = _report(result, config, fp32, weights.stat().st_size + len(config_bytes)
                         + (tmp / RECIPE_FILE).stat().st_size)
        (tmp / REPORT_FILE).write_bytes(report)
    return config


def _report(result, config, fp32: int, other_bytes: int) -> bytes:
    """report.json whose ``artifact_bytes`` counts every file, this one included."""
    body = {
        "layers": result.report,
        "calibration_samples": getattr(result, "calibration_samples", None),
        "seconds": getattr(result, "seconds", None),
        "metrics": getattr(result, "metrics", None),
        # layers the recipe selected but left unpruned because its mask structure does not fit them
        "unfit": dict(getattr(result, "unfit", {}) or {}),
        "layer_bytes": {n: {"stored": e["bytes"]["total"], "fp32": e["fp32_bytes"], "storage": e["storage"]}
                        for n, e in config["layers"].items()},
        "weights_file_bytes": config["weights_bytes"],
        "fp32_bytes": fp32,
    }
    total = other_bytes
    # The report's own length depends on the numbers in it. Each round's total only grows; once a
    # report comes out shorter than the total it states, trailing spaces (valid JSON) make it exact.
    while True:
        body["artifact_bytes"] = total
        body["compression_ratio"] = round(fp32 / total, 4) if total else None
        data = _json_bytes(body)
        need = other_bytes + len(data)
        if need <= total:
            return data + b" " * (total - need)
        total = need


# ---------------------------------------------------------------------------------------------
# load


def read_config(directory: Union[str, os.PathLike]) -> Dict[str, Any]:
    """The artifact's compression_config.json, checked for format and version."""
    d = Path(directory)
    if not d.is_dir():
        raise ValueError(f"artifact directory not found: {d}")
    path = d / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{d} is not an obcompress artifact: {CONFIG_FILE} is missing")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON (damaged?): {e}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{path} is not an obcompress artifact config (format {FORMAT!r} expected)")
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: artifact format version {version!r} is not known to this obcompress, "
                         f"which reads version {FORMAT_VERSION}")
    for key, kind in (("layers", dict), ("state", dict), ("aliases", dict), ("files", dict)):
        if not isinstance(config.get(key), kind):
            raise ValueError(f"{path}: entry {key!r} is missing or malformed")
    return config


def verify(directory: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Check an artifact without loading it into a model: its config, the weights file's recorded
    size and SHA-256, and that report.json's ``artifact_bytes`` is what the directory holds.
    Returns the config; raises ``ValueError`` naming what is wrong."""
    d = Path(directory)
    config = read_config(d)
    _check_weights_file(d, config)
    try:
        report = json.loads((d / REPORT_FILE).read_text(encoding="utf-8"))
        stated = int(report["artifact_bytes"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{d / REPORT_FILE} is missing or damaged ({e})") from None
    actual = artifact_size(d)
    if actual != stated:
        raise ValueError(f"{d}: report.json says the artifact is {stated:,d} bytes, the directory holds "
                         f"{actual:,d}: its files were changed after saving")
    return config


def _check_weights_file(directory: Path, config) -> Path:
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        raise ValueError(f"{directory}: {WEIGHTS_FILE} is missing")
    expect = config["files"].get(WEIGHTS_FILE)
    if not isinstance(expect, dict) or "bytes" not in expect or "sha256" not in expect:
        raise ValueError(f"{directory / CONFIG_FILE}: no size and checksum recorded for {WEIGHTS_FILE}")
    size = path.stat().st_size
    if size != expect["bytes"]:
        what = "truncated" if size < expect["bytes"] else "longer than written"
        raise ValueError(f"{path} is {what}: {size} bytes, the artifact recorded {expect['bytes']}")
    if _sha256(path) != expect["sha256"]:
        raise ValueError(f"{path} is corrupted: its SHA-256 does not match the one recorded at save")
    return path


def _read_weights(directory: Path, config) -> Dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = _check_weights_file(directory, config)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"{path} cannot be read as safetensors: {e}") from None


def _expect(tensors, key: str, shape, dtype: torch.dtype, where: str) -> torch.Tensor:
    t = tensors.get(key)
    if t is None:
        raise ValueError(f"{where}: tensor {key!r} is missing from {WEIGHTS_FILE}")
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
        raise ValueError(f"{where}: tensor {key!r} is {tuple(t.shape)} {t.dtype}, expected {tuple(shape)} {dtype}")
    return t


def _dtype(name, where: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"{where}: unknown dtype {name!r}")
    return _DTYPES[name]


@dataclass
class StoredLayer:
    """A compressed layer as an artifact holds it (see ``read_layers``)."""

    entry: Dict[str, Any]  # its compression_config.json entry
    weight: torch.Tensor  # (groups, rows, cols) in the layer's dtype, exactly as ``load`` writes it
    # Quantized layers: the integer codes (G, R, C) uint8, a pruned weight holding its zero point
    # (the code that decodes to 0); scale and zero point (G, R or 1, quantization groups) float32;
    # each column's quantization group (G, C).
    codes: Optional[torch.Tensor] = None
    scale: Optional[torch.Tensor] = None
    zero: Optional[torch.Tensor] = None
    column_groups: Optional[torch.Tensor] = None


def read_layers(directory: Union[str, os.PathLike]) -> Dict[str, StoredLayer]:
    """Every compressed layer of the artifact, rebuilt from its stored parts and checked (size,
    checksum, shapes) as ``load`` does, without a model."""
    directory = Path(directory)
    config = read_config(directory)
    tensors = _read_weights(directory, config)
    return {name: _stored_layer(name, e, tensors) for name, e in config["layers"].items()}


def _stored_layer(name: str, e: Dict[str, Any], tensors) -> StoredLayer:
    """The layer's weight (G, R, C) in its dtype (and its codes) from the stored parts; ValueError
    if they disagree."""
    where = f"artifact layer {name!r}"
    try:
        G, R, C = int(e["groups"]), int(e["rows"]), int(e["cols"])
        dtype = _dtype(e["dtype"], where)
        storage = e["storage"]
        q = e["quantization"]
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{where}: malformed entry ({err})") from None
    N = G * R * C
    mask = None
    if storage in (MASK_CODES, MASK_VALUES):
        packed = _expect(tensors, _layer_key(name, "mask"), (math.ceil(N / 8),), torch.uint8, where)
        mask = unpack_mask(packed, (G, R, C))
    elif storage not in (CODES, VALUES):
        raise ValueError(f"{where}: unknown storage {storage!r}")
    kept = N if mask is None else int(mask.sum())
    if storage in (VALUES, MASK_VALUES):
        values = _expect(tensors, _layer_key(name, "values"), (kept,), dtype, where)
        if mask is None:
            return StoredLayer(e, values.reshape(G, R, C))
        W = torch.zeros(G, R, C, dtype=dtype)
        W[mask] = values
        return StoredLayer(e, W)
    if not isinstance(q, dict):
        raise ValueError(f"{where}: codes stored without quantization settings")
    try:
        bits = int(q["bits"])
        scale_shape = [int(x) for x in q["scale_shape"]]
        strategy, group_size = q["strategy"], q["group_size"]
        sdt, zdt = _dtype(q["scale_dtype"], where), _dtype(q["zero_dtype"], where)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{where}: malformed quantization entry ({err})") from None
    if not 2 <= bits <= 8:
        raise ValueError(f"{where}: {bits}-bit codes; artifacts store 2..8 bits")
    packed = _expect(tensors, _layer_key(name, "codes"), (packed_size(kept, bits),), torch.uint8, where)
    codes_kept = unpack_bits(packed, bits, kept)
    if len(scale_shape) != 3 or scale_shape[0] != G or scale_shape[1] not in (1, R):
        raise ValueError(f"{where}: scale shape {scale_shape} does not fit {G} groups of {R} rows")
    scale = _expect(tensors, _layer_key(name, "scale"), scale_shape, sdt, where)
    zero_shape = q.get("zero_shape", scale_shape)
    if zero_shape not in (scale_shape, [1, 1, 1]):
        raise ValueError(f"{where}: zero point shape {zero_shape} fits neither the scale's {scale_shape} nor one value")
    zero = _expect(tensors, _layer_key(name, "zero"), zero_shape, zdt, where)
    g_idx = tensors.get(_layer_key(name, "g_idx"))
    if g_idx is not None and tuple(g_idx.shape) != (G, C):
        raise ValueError(f"{where}: g_idx has shape {tuple(g_idx.shape)}, expected {(G, C)}")
    if g_idx is None and strategy == "group" and (not isinstance(group_size, int) or group_size < 1):
        raise ValueError(f"{where}: group strategy without a valid group_size")
    col = column_groups(G, C, strategy, group_size, g_idx)
    if col.numel() and (int(col.min()) < 0 or int(col.max()) >= scale_shape[2]):
        raise ValueError(f"{where}: column groups out of range of {scale_shape[2]} scale groups")
    zero32 = zero.to(torch.float32).expand(scale_shape).contiguous()
    if mask is None:
        codes = codes_kept.reshape(G, R, C)
    else:
        # A pruned weight has no stored code; its zero point is the code that decodes to 0.
        idx = col[:, None, :].expand(G, R, C)
        codes = torch.gather(zero32.expand(G, R, scale_shape[2]), 2, idx).round().clamp(0, 2**bits - 1)
        codes = codes.to(torch.uint8)
        codes[mask] = codes_kept
    return StoredLayer(e, decode_codes(codes, scale, zero, col, mask, dtype), codes, scale.to(torch.float32),
                       zero32, col)


def load(directory: Union[str, os.PathLike], model: nn.Module) -> nn.Module:
    """Restore an artifact into ``model``, a skeleton of the same architecture; returns ``model``.

    Everything is read, checked and rebuilt before the first tensor of the model is written, so a
    refused artifact (missing, truncated, corrupted, unknown version, or names, shapes or dtypes
    that do not match the model) raises ValueError with the model unchanged.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    directory = Path(directory)
    config = read_config(directory)
    tensors = _read_weights(directory, config)
    sd = model.state_dict()

    layers = config["layers"]
    expected_keys = set(config["state"]) | set(config["aliases"])
    expected_keys |= {e.get("state_key") for e in layers.values() if isinstance(e, dict)}
    missing = sorted(k for k in expected_keys if k not in sd)
    unexpected = sorted(k for k in sd if k not in expected_keys)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"the model lacks {len(missing)} entries of the artifact, e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"the artifact lacks {len(unexpected)} entries of the model, e.g. {unexpected[:3]}")
        raise ValueError("artifact does not match the model's architecture: " + "; ".join(parts))

    new: Dict[str, torch.Tensor] = {}
    found = None
    for name, e in layers.items():
        if not isinstance(e, dict) or "state_key" not in e:
            raise ValueError(f"artifact layer {name!r}: malformed entry")
        if found is None:
            found = find_layers(model)
        info = found.get(name)
        if info is None:
            raise ValueError(f"artifact does not match the model: its layer {name!r} is not a compressible layer "
                             "of the model")
        if (info.kind, info.groups, info.rows, info.cols) != (e.get("kind"), e.get("groups"), e.get("rows"), e.get("cols")):
            raise ValueError(f"artifact does not match the model: layer {name!r} is a {e.get('kind')} of (groups, rows, cols) = "
                             f"{(e.get('groups'), e.get('rows'), e.get('cols'))}, the model's is a {info.kind} of "
                             f"{(info.groups, info.rows, info.cols)}")
        target = sd[e["state_key"]]
        if list(target.shape) != e.get("weight_shape"):
            raise ValueError(f"artifact does not match the model: layer {name!r} has weight shape {e.get('weight_shape')}, the model's is "
                             f"{list(target.shape)}")
        W = _stored_layer(name, e, tensors).weight
        if W.dtype != target.dtype:
            raise ValueError(f"artifact layer {name!r} holds {W.dtype} weights, the model's are {target.dtype}")
        new[e["state_key"]] = _to_module_layout(info.kind, W, tuple(target.shape))

    for key, meta in config["state"].items():
        t = _expect(tensors, _state_key(key), meta.get("shape", ()), _dtype(meta.get("dtype"), f"state {key!r}"),
                    f"state {key!r}")
        target = sd[key]
        if t.shape != target.shape or t.dtype != target.dtype:
            raise ValueError(f"artifact does not match the model: state entry {key!r} is {tuple(t.shape)} {t.dtype} "
                             f"in the artifact, in the model "
                             f"{tuple(target.shape)} {target.dtype}")
        new[key] = t
    for key, source in config["aliases"].items():
        if source not in new:
            raise ValueError(f"state entry {key!r} is recorded as tied to {source!r}, which the artifact lacks")
        if new[source].shape != sd[key].shape or new[source].dtype != sd[key].dtype:
            raise ValueError(f"state entry {key!r} is tied to {source!r} in the artifact but has another shape "
                             "or dtype in the model")
        new[key] = new[source]

    quantizers = quantizers_from_dict(config.get("activation_quantizers", {}))
    unknown = sorted(set(quantizers) - set(find_layers(model))) if quantizers else []
    if unknown:
        raise ValueError(f"artifact has activation quantizers for layers the model lacks: {unknown[:3]}")
    with torch.no_grad():
        for key, t in new.items():
            sd[key].copy_(t)
    if quantizers:
        attach(model, None, quantizers)
    return model
