"""Export an artifact as a Hugging Face checkpoint in the compressed-tensors format.

``export_compressed_tensors(model, artifact_dir, out_dir)`` writes a directory that
``transformers.AutoModelForCausalLM.from_pretrained(out_dir)`` loads when the ``compressed-tensors``
package is installed (LLM servers such as vLLM read the same format; not tested here): ``config.json`` with a
``quantization_config``, ``model.safetensors``, ``generation_config.json`` and the tokenizer files of
the source model. The written tensors follow the format's ``pack-quantized`` layout, produced here
from the artifact's own codes (the package is not needed to write, only to load):

    <layer>.weight_packed      int32 (rows, words): each row's integer codes, bit-packed
    <layer>.weight_scale       (1,) tensor / (rows, 1) channel / (rows, groups) group, the model's dtype
    <layer>.weight_zero_point  asymmetric grids only: int32 zero points packed along the rows
                               (int8 (1,) for one per tensor)
    <layer>.weight_shape       int64 (2,): rows, cols
    <layer>.weight_g_idx       int32 (cols,): the group of each column, GPTQ act-order only
    <layer>.input_scale        (1,), <layer>.input_zero_point int8 (1,) when asymmetric: the
                               per-tensor input quantizer of a W+A recipe

A code is stored as its unsigned value (the format's signed value plus 2^(bits-1)), so a weight is
``scale * (code - zero)`` exactly as ``QuantGrid.decode`` computes it: a float32 model reloads with
bit-identical weights (a bfloat16 or float16 one within a rounding of its dtype, since the reader
keeps scales in the model's dtype). A W+A recipe's per-tensor input quantizers become static
``input_activations``; symmetric ones quantize exactly as obcompress does, asymmetric ones may
differ by one level where x / scale lies within a float32 rounding of a half-integer, since the
reader adds the zero point before rounding. Packing: 32 codes fill ``bits`` int32 words, least significant bit first
(compressed-tensors >= 0.18), or, for readers before 0.18, each word holds ``32 // bits`` codes and
leaves its high bits zero; the two agree for 2, 4 and 8 bits. Which reader a checkpoint is written for
is ``ct_version``: the installed compressed-tensors by default, else the newest version tested.

Each distinct weight scheme (bits, symmetric, strategy, group size, act-order, input quantizer) is one
entry of ``config_groups`` whose ``targets`` name its layers, so a mixed-precision recipe from
``obcompress search select`` or ``search fit`` exports as one checkpoint.

What the format cannot express, and what happens to it:

- Sparsity has no compressed encoding in the compressed-tensors versions transformers 5 loads
  (>= 0.15 removed the sparse-bitmask, sparse-24-bitmask and marlin-24 compressors; transformers
  4.x-era readers had them). Pruned weights are therefore written densely: inside the packed codes
  (a pruned weight is its row's zero code, so 2:4 + 4-bit costs what 4-bit costs) or as float
  weights when the layer is not quantized. The structure is recorded in ``sparsity_config``
  (``format: dense``, ``sparsity_structure``, ``targets``) and a warning says the bytes are not
  smaller. Block sparsity is written the same way.
- Quantization groups need equal sizes: a ragged last group (cols not a multiple of the group size)
  is written as smaller equal groups of gcd(group size, cols) columns with repeated scales, which is
  exact and costs a few more scales.
- Asymmetric grids have the format's zero points (``weight_zero_point``), but transformers cannot
  load them with compressed-tensors >= 0.18 (its loader expects them unpacked; vLLM reads them). For
  those readers an asymmetric b-bit grid is written, by default, as the symmetric (b+1)-bit grid with
  the same scale and codes ``code - zero``: exact, one bit more per weight, with a warning
  (``asymmetric="zero-point"`` writes the zero points regardless). An asymmetric 8-bit layer has no
  9-bit form and is written as dense float weights there.
- GPTQ act-order groups need ``weight_g_idx``, which compressed-tensors 0.19 removed: for those
  readers the layer is written as dense float weights, with a warning.
- Only ``nn.Linear`` layers can carry a scheme; a compressed convolution or transformers ``Conv1D`` is
  written as dense float weights, with a warning.
- An input quantizer on a layer written densely cannot be expressed: refused with a ValueError.

Nothing is ever lost silently: after writing, every tensor is read back and every layer's weight is
rebuilt from the written layout (independently of the package) and compared with the model's.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from ..model.activations import quantizers_from_dict
from ..model.layers import find_layers
from .._progress import progress_bar
from ..files import atomic_directory
from .artifact import StoredLayer, fp32_size, load, read_config, read_layers

__all__ = [
    "CT_TESTED_VERSIONS",
    "CTExport",
    "ct_layout",
    "export_compressed_tensors",
    "pack_int32",
    "read_ct_weight",
    "unpack_int32",
]

# The compressed-tensors versions whose transformers loading this was tested with (pyproject's hf extra).
CT_TESTED_VERSIONS = ("0.15.0.1", "0.20.1")
_DENSE_PACKING_SINCE = (0, 18)  # 32 codes in `bits` words; before, 32 // bits codes per word
_NO_G_IDX_SINCE = (0, 19)  # actorder "group" and weight_g_idx removed
# From 0.18 on, transformers' loading path sizes weight_zero_point unpacked while the checkpoint holds
# it packed, so asymmetric pack-quantized checkpoints fail to load there (llm-compressor#1618); vLLM
# reads zero points with its own loader.
_NO_ZERO_POINT_LOAD_SINCE = (0, 18)
_OLDEST_READER = (0, 15)  # what transformers 5 accepts; older readers have other sparse formats
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
    "chat_template.jinja", "chat_template.json", "preprocessor_config.json", "processor_config.json",
)


def _version_tuple(v: str) -> Tuple[int, ...]:
    out = []
    for part in str(v).split("."):
        digits = "".join(ch for ch in part if ch.isdigit()) if part else ""
        if not part or not part[0].isdigit():
            break
        out.append(int(digits))
    return tuple(out)


@dataclass(frozen=True)
class CTLayout:
    """How a checkpoint is laid out for one compressed-tensors reader version."""

    version: str
    dense_packing: bool
    g_idx: bool
    zero_points: bool  # transformers can load weight_zero_point with this reader


def ct_layout(version: Optional[str] = None) -> CTLayout:
    """The layout for compressed-tensors ``version``; None: the installed package's version, or the
    newest tested one when it is not installed."""
    if version is None:
        try:
            from importlib.metadata import PackageNotFoundError, version as installed
            version = installed("compressed-tensors")
        except PackageNotFoundError:
            version = CT_TESTED_VERSIONS[-1]
    v = _version_tuple(version)
    if len(v) < 2:
        raise ValueError(f"compressed-tensors version {version!r} is not a version number like 0.18.0")
    if v < _OLDEST_READER:
        raise ValueError(f"compressed-tensors {version} predates 0.15, which transformers 5 needs; this exporter "
                         "writes for 0.15 and later (older readers expect other sparse layouts)")
    return CTLayout(str(version), v >= _DENSE_PACKING_SINCE, v < _NO_G_IDX_SINCE, v < _NO_ZERO_POINT_LOAD_SINCE)


# ---------------------------------------------------------------------------------------------
# packing


def _words(cols: int, bits: int, dense: bool) -> int:
    return math.ceil(cols * bits / 32) if dense else math.ceil(cols / (32 // bits))


def pack_int32(codes: torch.Tensor, bits: int, dense: bool = True, dim: int = 1) -> torch.Tensor:
    """Pack unsigned codes (2-D, each < 2**bits) along ``dim`` into int32 words.

    ``dense``: code i of a row occupies bits [i*bits, (i+1)*bits) of the row's bit stream, least
    significant bit first, and word k holds stream bits [32k, 32k+32) (its bit 0 is stream bit 32k);
    a row takes ceil(cols * bits / 32) words. Otherwise word k holds codes k*p .. k*p+p-1 with
    p = 32 // bits, code k*p+j in bits [j*bits, (j+1)*bits), the high bits zero.
    """
    if codes.dim() != 2:
        raise ValueError(f"pack_int32 expects a 2-D tensor of codes, got shape {tuple(codes.shape)}")
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    c = codes.detach().cpu().to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in 0..{(1 << bits) - 1}")
    if dim == 0:
        return pack_int32(c.t(), bits, dense, 1).t().contiguous()
    rows, cols = c.shape
    per_word = 32 if dense else 32 // bits  # codes per unit of `unit_bits` stream bits
    unit_bits = 32 * bits if dense else 32
    units = math.ceil(cols / per_word)
    padded = torch.zeros(rows, units * per_word, dtype=torch.uint8)
    padded[:, :cols] = c.to(torch.uint8)
    # Each code's low `bits` bits, LSB first, as one byte per bit; then zero filler up to the unit.
    stream = np.unpackbits(padded.numpy()[:, :, None], axis=2, count=bits, bitorder="little")
    stream = stream.reshape(rows, units, per_word * bits)
    if per_word * bits < unit_bits:
        stream = np.concatenate([stream, np.zeros((rows, units, unit_bits - per_word * bits), np.uint8)], axis=2)
    packed = np.packbits(stream.reshape(rows, -1), axis=1, bitorder="little")
    words = np.ascontiguousarray(packed).view("<i4").astype(np.int32)
    return torch.from_numpy(words[:, :_words(cols, bits, dense)].copy())


def unpack_int32(words: torch.Tensor, bits: int, cols: int, dense: bool = True, dim: int = 1) -> torch.Tensor:
    """Inverse of ``pack_int32``: the unsigned codes (int64), ``cols`` of them along ``dim``."""
    if words.dim() != 2 or words.dtype != torch.int32:
        raise ValueError(f"unpack_int32 expects 2-D int32 words, got {tuple(words.shape)} {words.dtype}")
    if dim == 0:
        return unpack_int32(words.t().contiguous(), bits, cols, dense, 1).t().contiguous()
    rows, n = words.shape
    if n != _words(cols, bits, dense):
        raise ValueError(f"{n} words per row cannot hold {cols} codes of {bits} bits "
                         f"({_words(cols, bits, dense)} expected)")
    per_word = 32 if dense else 32 // bits
    unit_bits = 32 * bits if dense else 32
    units = math.ceil(cols / per_word)
    raw = np.ascontiguousarray(words.numpy().astype("<i4")).view(np.uint8).reshape(rows, -1)
    stream = np.unpackbits(raw, axis=1, bitorder="little")
    need = units * unit_bits
    if stream.shape[1] < need:
        stream = np.concatenate([stream, np.zeros((rows, need - stream.shape[1]), np.uint8)], axis=1)
    stream = stream[:, :need].reshape(rows, units, unit_bits)[:, :, :per_word * bits]
    values = np.packbits(stream.reshape(rows, units * per_word, bits), axis=2, bitorder="little")
    return torch.from_numpy(values.reshape(rows, -1)[:, :cols].astype(np.int64))


# ---------------------------------------------------------------------------------------------
# one layer


@dataclass
class _Scheme:
    """A config group's scheme: what makes two layers share one entry of ``config_groups``."""

    bits: int
    symmetric: bool
    strategy: str  # tensor | channel | group
    group_size: Optional[int]
    act_order: bool
    input_bits: Optional[int] = None
    input_symmetric: Optional[bool] = None

    def key(self) -> tuple:
        return (self.bits, self.symmetric, self.strategy, self.group_size, self.act_order, self.input_bits,
                self.input_symmetric)

    def to_config(self, targets: List[str]) -> Dict[str, Any]:
        weights = {
            "num_bits": self.bits, "type": "int", "symmetric": self.symmetric, "strategy": self.strategy,
            "group_size": self.group_size, "block_structure": None, "dynamic": False,
            "actorder": "group" if self.act_order else None, "observer": "minmax", "observer_kwargs": {},
        }
        inputs = None
        if self.input_bits is not None:
            inputs = {"num_bits": self.input_bits, "type": "int", "symmetric": self.input_symmetric,
                      "strategy": "tensor", "group_size": None, "block_structure": None, "dynamic": False,
                      "actorder": None, "observer": "minmax", "observer_kwargs": {}}
        return {"targets": targets, "weights": weights, "input_activations": inputs, "output_activations": None,
                "format": "pack-quantized"}


def _regroup(layer: StoredLayer) -> Tuple[str, Optional[int], torch.Tensor, Optional[torch.Tensor]]:
    """The layer's grid as equal-sized groups: (strategy, group size, scale index per new group,
    g_idx per column or None). compressed-tensors splits the columns into groups of one size (in
    g_idx order when given), so groups of unequal size become groups of their gcd with repeated scales."""
    q = layer.entry["quantization"]
    _, R, C = layer.weight.shape
    if q["strategy"] == "tensor":
        return "tensor", None, torch.zeros(1, dtype=torch.long), None
    col = layer.column_groups[0]
    n = layer.scale.shape[-1]
    counts = torch.bincount(col, minlength=n)
    used = torch.nonzero(counts).reshape(-1)
    if len(used) == 1:
        return "channel", None, used, None
    size = math.gcd(*[int(x) for x in counts[used]])
    runs = bool((col[1:] >= col[:-1]).all())
    if runs:
        # Consecutive runs: new group j is columns [j*size, (j+1)*size), all in one old group.
        source = col[torch.arange(0, C, size)]
        return "group", size, source, None
    # Act-order: split each old group's columns (in column order) into runs of `size`.
    new_idx = torch.empty(C, dtype=torch.long)
    source = []
    for g in used.tolist():
        members = torch.nonzero(col == g).reshape(-1)
        base = len(source)
        new_idx[members] = base + torch.arange(len(members)) // size
        source.extend([g] * (len(members) // size))
    return "group", size, torch.tensor(source, dtype=torch.long), new_idx.to(torch.int32)


def _encode(name: str, layer: StoredLayer, layout: CTLayout, dtype: torch.dtype, input_quantizer,
            widen: bool) -> Tuple[_Scheme, Dict[str, torch.Tensor]]:
    """A quantized linear layer's scheme and tensors (names relative to the layer). ``widen``: an
    asymmetric b-bit grid is written as the symmetric (b+1)-bit grid with the same scale, whose
    codes code - zero (in -(2^b - 1) .. 2^b - 1) decode to the very same weights."""
    q = layer.entry["quantization"]
    bits, symmetric = int(q["bits"]), bool(q["symmetric"])
    _, R, C = layer.weight.shape
    strategy, size, source, g_idx = _regroup(layer)
    half = 1 << (bits - 1)
    n_old = layer.scale.shape[-1]
    # scale and zero are (1 or R, groups) per conv group: both to (R, groups).
    scale_old = layer.scale[0].expand(R, n_old)
    zero_old = layer.zero[0].expand(R, n_old)
    scale, zero = scale_old[:, source], zero_old[:, source]
    # The format has no mask: a pruned weight is its zero point's code (read_layers puts it there),
    # which decodes to exactly 0 on every grid obcompress fits (integer zero points); the written
    # layer is checked against the model's weight after writing.
    codes = layer.codes[0].to(torch.int64)
    if widen and not symmetric:
        if bits >= 8:
            raise ValueError(f"layer {name!r}: an asymmetric 8-bit grid cannot be widened (9 bits)")
        per_col = zero_old[:, layer.column_groups[0]]
        if not torch.equal(per_col, per_col.round()):
            raise ValueError(f"layer {name!r}: zero points that are not integers cannot be widened")
        codes = codes - per_col.to(torch.int64) + (1 << bits)
        bits, symmetric = bits + 1, True
        half = 1 << (bits - 1)
        zero = torch.full_like(scale, float(half))
    scheme = _Scheme(bits, symmetric, strategy, size, g_idx is not None)
    t: Dict[str, torch.Tensor] = {
        "weight_packed": pack_int32(codes, bits, layout.dense_packing),
        "weight_shape": torch.tensor([R, C], dtype=torch.int64),
    }
    if strategy == "tensor":
        t["weight_scale"] = scale.reshape(-1)[:1].to(dtype).contiguous()
    else:
        t["weight_scale"] = scale.to(dtype).contiguous()
    if not symmetric:
        if not torch.equal(zero, zero.round()) or zero.min() < 0 or zero.max() > 2 * half - 1:
            raise ValueError(f"layer {name!r}: asymmetric zero points must be integers in 0..{2 * half - 1}")
        if strategy == "tensor":
            t["weight_zero_point"] = (zero.reshape(-1)[:1] - half).to(torch.int8)
        else:
            t["weight_zero_point"] = pack_int32(zero.to(torch.int64), bits, layout.dense_packing, dim=0)
    elif not torch.all(zero == half):
        raise ValueError(f"layer {name!r}: a symmetric grid with zero points other than {half}")
    if g_idx is not None:
        t["weight_g_idx"] = g_idx
    if input_quantizer is not None:
        scheme.input_bits, scheme.input_symmetric = input_quantizer.bits, input_quantizer.symmetric
        t["input_scale"] = torch.tensor([input_quantizer.scale], dtype=torch.float32).to(dtype)
        if not input_quantizer.symmetric:
            t["input_zero_point"] = torch.tensor([input_quantizer.zero - (1 << (input_quantizer.bits - 1))],
                                                 dtype=torch.int8)
    return scheme, t


def read_ct_weight(tensors: Dict[str, torch.Tensor], prefix: str, config_group: Dict[str, Any],
                   dense_packing: bool) -> torch.Tensor:
    """A linear layer's weight (float32) from its pack-quantized tensors (``prefix + ".weight_packed"``
    and the rest) under the scheme ``config_group``: the format's definition, written out apart from
    the writer above; it is how an export is checked."""
    w = config_group["weights"]
    bits, symmetric, strategy = int(w["num_bits"]), bool(w["symmetric"]), w["strategy"]
    R, C = (int(x) for x in tensors[prefix + ".weight_shape"].tolist())
    codes = unpack_int32(tensors[prefix + ".weight_packed"], bits, C, dense_packing).to(torch.float32)
    half = 1 << (bits - 1)
    scale = tensors[prefix + ".weight_scale"].to(torch.float32)
    if strategy == "tensor":
        per_col = torch.zeros(C, dtype=torch.long)
        scale = scale.reshape(1, 1)
    elif strategy == "channel":
        per_col = torch.zeros(C, dtype=torch.long)
    else:
        size = int(w["group_size"])
        g_idx = tensors.get(prefix + ".weight_g_idx")
        per_col = g_idx.to(torch.long) if g_idx is not None else torch.arange(C) // size
    if symmetric:
        zero = torch.full((1, 1), float(half))
    elif strategy == "tensor":
        zero = tensors[prefix + ".weight_zero_point"].to(torch.float32).reshape(1, 1) + half
    else:
        zero = unpack_int32(tensors[prefix + ".weight_zero_point"], bits, R, dense_packing, dim=0).to(torch.float32)
    s = scale.expand(R, scale.shape[-1])[:, per_col]
    z = zero.expand(R, zero.shape[-1])[:, per_col] if zero.shape[-1] > 1 else zero.expand(R, C)
    return s * (codes - z)


# ---------------------------------------------------------------------------------------------
# the checkpoint


@dataclass
class CTExport:
    """What ``export_compressed_tensors`` wrote: ``bytes`` is the directory's size on disk."""

    directory: Path
    bytes: int
    fp32_bytes: int
    weights_bytes: int
    layers: Dict[str, Dict[str, Any]]  # name -> {"written": "pack-quantized" | "dense", "group", "bytes", ...}
    config_groups: Dict[str, Dict[str, Any]]
    sparsity: Optional[Dict[str, Any]]
    ct_version: str
    warnings: List[str] = field(default_factory=list)

    def table(self) -> str:
        head = f"{'layer':<40} {'written as':>16} {'bits':>4} {'group':>6} {'sparsity':>8} {'bytes':>11}"
        lines = [head, "-" * len(head)]
        for n, e in self.layers.items():
            bits = "-" if e.get("bits") is None else str(e["bits"])
            group = e.get("group_size") or e.get("strategy") or "-"
            lines.append(f"{n:<40} {e['written']:>16} {bits:>4} {str(group):>6} {e['sparsity']:>8.3f} "
                         f"{e['bytes']:>11,d}")
        lines.append(f"{self.directory}: {self.bytes:,d} bytes on disk ({self.weights_bytes:,d} of weights), fp32 "
                     f"{self.fp32_bytes:,d} bytes ({self.fp32_bytes / max(self.bytes, 1):.1f}x smaller); "
                     f"{len(self.config_groups)} config group(s), written for compressed-tensors {self.ct_version}")
        return "\n".join(lines)


def _directory_size(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def _is_previous_export(d: Path) -> bool:
    try:
        cfg = json.loads((d / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and isinstance(cfg.get("quantization_config"), dict) and \
        cfg["quantization_config"].get("quant_method") == "compressed-tensors"


def _tokenizer_source(model: nn.Module, tokenizer_dir) -> Optional[Path]:
    if tokenizer_dir is not None:
        d = Path(tokenizer_dir)
        if not d.is_dir():
            raise ValueError(f"tokenizer directory not found: {d}")
        return d
    for cand in (getattr(model, "name_or_path", None), getattr(getattr(model, "config", None), "_name_or_path", None)):
        if cand and Path(str(cand)).is_dir():
            return Path(str(cand))
    return None


def _tied_keys(sd: Dict[str, torch.Tensor]) -> Dict[str, List[str]]:
    by_storage: Dict[Any, List[str]] = {}
    for k, t in sd.items():
        if t.numel():
            by_storage.setdefault((t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)), []).append(k)
    return {k: keys for keys in by_storage.values() if len(keys) > 1 for k in keys}


ASYMMETRIC_MODES = ("auto", "zero-point", "widen")


def export_compressed_tensors(model: nn.Module, artifact_dir: Union[str, os.PathLike], out_dir: Union[str, os.PathLike],
                              *, tokenizer_dir: Union[str, os.PathLike, None] = None, ct_version: Optional[str] = None,
                              asymmetric: str = "auto", progress: bool = False) -> CTExport:
    """Load the artifact into ``model`` (a transformers ``PreTrainedModel`` skeleton of the same
    architecture) and write it to ``out_dir`` as a compressed-tensors checkpoint.

    ``tokenizer_dir``: where the tokenizer files are copied from (default: the directory the model
    was loaded from, if any). ``ct_version``: the compressed-tensors version the checkpoint is laid
    out for (default: the installed one, else the newest tested). ``asymmetric``: how asymmetric
    grids are written: ``zero-point`` (the format's weight_zero_point, which vLLM reads; transformers
    with compressed-tensors >= 0.18 cannot load it), ``widen`` (as symmetric grids one bit wider:
    exact, loadable everywhere, one more bit per weight; 8-bit ones as dense weights), or ``auto``:
    zero-point for readers that load it, else widen. The directory appears complete or not at all;
    an existing ``out_dir`` is replaced only when empty or a previous export.
    """
    if not (isinstance(model, nn.Module) and hasattr(model, "save_pretrained") and hasattr(model, "config")):
        raise ValueError("the compressed-tensors export needs a Hugging Face transformers model (e.g. --model hf:DIR); "
                         f"got {type(model).__name__}. For other models use the ONNX export")
    if getattr(model, "hf_quantizer", None) is not None:
        method = getattr(getattr(model.hf_quantizer, "quantization_config", None), "quant_method", "?")
        raise ValueError(f"the model was loaded through transformers' {getattr(method, 'value', method)} quantizer, "
                         "which makes it unsaveable: load a plain float checkpoint (a config.json without "
                         "quantization_config) to export from")
    layout = ct_layout(ct_version)
    if asymmetric not in ASYMMETRIC_MODES:
        raise ValueError(f"asymmetric must be one of {', '.join(ASYMMETRIC_MODES)}, got {asymmetric!r}")
    widen = asymmetric == "widen" or (asymmetric == "auto" and not layout.zero_points)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not _is_previous_export(out):
        raise ValueError(f"{out} is a non-empty directory that is not a compressed-tensors export; refusing to replace it")
    tok_src = _tokenizer_source(model, tokenizer_dir)

    config = read_config(artifact_dir)
    stored = read_layers(artifact_dir)
    load(artifact_dir, model)
    found = find_layers(model)
    quantizers = quantizers_from_dict(config.get("activation_quantizers", {}) or {})
    sd = dict(model.state_dict())
    tied = _tied_keys(sd)
    dtype = next((t.dtype for t in sd.values() if t.is_floating_point()), torch.float32)
    notes: List[str] = []
    layer_report: Dict[str, Dict[str, Any]] = {}
    groups: Dict[tuple, Tuple[_Scheme, List[str]]] = {}
    written_tensors: Dict[str, Dict[str, torch.Tensor]] = {}
    pruned: Dict[str, Tuple[Optional[str], int, int]] = {}
    widened: List[str] = []
    for name, layer in progress_bar(stored.items(), progress=progress, desc="export", unit="layer"):
        info = found[name]
        wkey = f"{name}.weight"
        G, R, C = layer.weight.shape
        entry = layer.entry
        # The artifact drops the mask where plain codes are smaller (a pruned weight is then its zero
        # code), so the entry's recorded sparsity and structure say what was pruned.
        sparsity = float(entry.get("sparsity") or 0.0)
        structure = entry.get("mask_structure") or ("unstructured" if sparsity > 0 else None)
        if structure is not None and sparsity > 0:
            pruned[name] = (structure, round(sparsity * G * R * C), G * R * C)
        q = entry.get("quantization")
        reason = None
        if q is not None:
            if not isinstance(info.module, nn.Linear):
                reason = (f"a {type(info.module).__name__} cannot carry a compressed-tensors scheme (Linear layers "
                          "only)")
            elif q.get("act_order_groups") and not layout.g_idx:
                reason = (f"its act-order groups need weight_g_idx, which compressed-tensors {layout.version} no "
                          "longer reads (removed in 0.19; pass ct_version / --ct-version 0.18.0 for older readers)")
            elif wkey in tied:
                reason = f"its weight is tied to {[k for k in tied[wkey] if k != wkey]}"
            elif widen and not q["symmetric"] and int(q["bits"]) >= 8:
                reason = ("an asymmetric 8-bit grid has no symmetric form of 9 bits, and transformers with "
                          f"compressed-tensors {layout.version} cannot load zero points (asymmetric='zero-point' "
                          "writes them for vLLM)")
        aq = quantizers.get(name)
        rec = {"written": "dense", "bits": None, "group_size": None, "strategy": None,
               "sparsity": sparsity, "mask_structure": structure}
        if q is not None and reason is None:
            scheme, tensors = _encode(name, layer, layout, dtype, aq, widen)
            if widen and not q["symmetric"]:
                widened.append(name)
            written_tensors[name] = tensors
            group = groups.setdefault(scheme.key(), (scheme, []))
            group[1].append(name)
            rec.update(written="pack-quantized", bits=scheme.bits, group_size=scheme.group_size,
                       strategy=scheme.strategy, act_order=scheme.act_order,
                       bytes=sum(t.numel() * t.element_size() for t in tensors.values()))
        else:
            if aq is not None:
                raise ValueError(f"layer {name!r}: its input quantizer cannot be written, since the layer itself is "
                                 f"written as dense weights ({reason or 'it is not quantized'})")
            if reason is not None:
                notes.append(f"layer {name!r} written as dense {str(dtype).replace('torch.', '')} weights: {reason}")
            t = sd[wkey]
            rec["bytes"] = t.numel() * t.element_size()
        layer_report[name] = rec
    if widened:
        notes.append(f"{len(widened)} asymmetric layer(s) written as symmetric grids one bit wider (exact): transformers "
                     f"with compressed-tensors {layout.version} cannot load zero points; asymmetric='zero-point' "
                     "(--asymmetric zero-point) writes the format's zero points, which vLLM reads")
    if pruned:
        dense_bytes = sum(layer_report[n]["bytes"] for n in pruned)
        notes.append(f"{len(pruned)} pruned layer(s) written densely ({dense_bytes:,d} bytes): the compressed-tensors "
                     "versions transformers loads have no sparse storage, so zeros take as many bytes as other "
                     "weights (the structure is recorded in sparsity_config)")

    config_groups: Dict[str, Dict[str, Any]] = {}
    for i, (scheme, names) in enumerate(groups.values()):
        config_groups[f"group_{i}"] = scheme.to_config(sorted(names))
        for n in names:
            layer_report[n]["group"] = f"group_{i}"
    split = _split_fused(layer_report, [n for n, _ in model.named_modules()])
    if split:
        notes.append(f"layers that LLM servers fuse into one matrix have different schemes: {split[:3]}; "
                     "transformers loads this, vLLM wants one scheme per fused q/k/v and gate/up")
    sparsity = None
    if pruned:
        structures = {st for st, _, _ in pruned.values()}
        zeros, total = sum(z for _, z, _ in pruned.values()), sum(t for _, _, t in pruned.values())
        # The format names one structure per model: N:M when every pruned layer shares it; block and
        # mixed patterns are, to a reader, unstructured zeros.
        single = structures.pop() if len(structures) == 1 else None
        structure = single if single is not None and ":" in single and not single.startswith("block") \
            else "unstructured"
        sparsity = {"format": "dense", "global_sparsity": zeros / total, "sparsity_structure": structure,
                    "targets": sorted(pruned), "ignore": [], "registry_requires_subclass": False}
    qconfig = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized" if groups else "dense",
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": [],
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": sparsity or {},
        "transform_config": {},
        "version": layout.version,
    }

    state: Dict[str, torch.Tensor] = {}
    for k, t in sd.items():
        layer = k[: -len(".weight")] if k.endswith(".weight") else None
        if layer in written_tensors:
            for part, v in written_tensors[layer].items():
                state[f"{layer}.{part}"] = v
        else:
            state[k] = t.detach().cpu()

    # Written whole into a temporary sibling that then replaces out_dir: the old export or the new
    # one, never half of one.
    with atomic_directory(out) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _quiet_save(model, tmp, state)
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        cfg["quantization_config"] = qconfig
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if tok_src is not None:
            for fname in TOKENIZER_FILES:
                src = tok_src / fname
                if src.is_file():
                    shutil.copyfile(src, tmp / fname)
        weights_bytes = sum(p.stat().st_size for p in tmp.glob("*.safetensors"))
        _check_written(tmp, model, sd, config_groups, layout, layer_report)
    for n in notes:
        warnings.warn(n, stacklevel=2)
    return CTExport(out, _directory_size(out), fp32_size(model), weights_bytes, layer_report, config_groups,
                    sparsity, layout.version, notes)


# Sibling layers that vLLM and others run as one fused matrix (Llama-style names).
_FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _split_fused(layer_report: Dict[str, Dict[str, Any]], module_names: List[str]) -> List[List[str]]:
    """Groups of fused siblings whose written schemes differ (a layer not exported counts as dense)."""
    present = set(module_names)
    out = []
    for parent in sorted({n.rsplit(".", 1)[0] for n in layer_report if "." in n}):
        for fused in _FUSED:
            names = [f"{parent}.{f}" for f in fused]
            if not all(n in present for n in names):
                continue
            kinds = {layer_report.get(n, {}).get("group", "dense") for n in names}
            if len(kinds) > 1:
                out.append(names)
    return out


def _quiet_save(model: nn.Module, directory: Path, state: Dict[str, torch.Tensor]) -> None:
    """``save_pretrained`` with our state dict: it writes config.json and generation_config.json, drops
    tied duplicates and undoes transformers' own key renamings, as for any checkpoint."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - a transformers model implies transformers
        hf_logging = None
    bars = hf_logging is not None and hf_logging.is_progress_bar_enabled()
    if bars:
        hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(str(directory), state_dict=state)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _check_written(directory: Path, model: nn.Module, sd: Dict[str, torch.Tensor], config_groups, layout: CTLayout,
                   layer_report) -> None:
    """Read the checkpoint back and rebuild every layer from the written layout: each must equal the
    model's weight, and every other tensor the model's own, or the export is refused."""
    from safetensors.torch import load_file

    written: Dict[str, torch.Tensor] = {}
    for p in sorted(directory.glob("*.safetensors")):
        written.update(load_file(str(p)))
    scheme_of = {n: g for g in config_groups.values() for n in g["targets"]}
    for name, rec in layer_report.items():
        target = sd[f"{name}.weight"]
        if rec["written"] == "pack-quantized":
            W = read_ct_weight(written, name, scheme_of[name], layout.dense_packing).to(target.dtype)
            ref = target.detach().cpu()
            # float32 models reload bit for bit. Lower precisions keep their scales in the model's dtype
            # (the reader casts them to it), so a weight may move by a rounding of that dtype.
            exact = torch.equal(W, ref) if ref.dtype == torch.float32 else torch.allclose(
                W.float(), ref.float(), rtol=2 * torch.finfo(ref.dtype).eps, atol=0.0)
            if not exact:
                diff = float((W.float() - target.detach().cpu().float()).abs().max())
                raise ValueError(f"layer {name!r}: the written compressed-tensors weight differs from the model's "
                                 f"(max abs diff {diff:.3g}); nothing was written")
            rec["bytes"] = sum(written[k].numel() * written[k].element_size() for k in written
                               if k.startswith(name + ".") and k[len(name) + 1:].split(".")[0] in (
                                   "weight_packed", "weight_scale", "weight_zero_point", "weight_shape",
                                   "weight_g_idx", "input_scale", "input_zero_point"))
    # Every other tensor as the model holds it; a tied duplicate is dropped on purpose when its source is there.
    tied = _tied_keys(sd)
    missing, changed = [], []
    for k, t in sd.items():
        if k.endswith(".weight") and k[: -len(".weight")] in scheme_of:
            continue
        if k not in written:
            if not any(o in written for o in tied.get(k, [])):
                missing.append(k)
        elif not torch.equal(written[k], t.detach().cpu()):
            changed.append(k)
    if missing or changed:
        what = [f"lacks {len(missing)} tensors of the model, e.g. {missing[:3]}"] if missing else []
        what += [f"changes {len(changed)}, e.g. {changed[:3]}"] if changed else []
        raise ValueError("the written checkpoint " + " and ".join(what) + "; nothing was written")
