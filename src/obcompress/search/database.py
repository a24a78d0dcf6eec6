"""The database of a model: every layer's compressed variants, on disk, from one calibration pass.

Per layer one safetensors file holds what it takes to rebuild any variant of the search space
exactly, and nothing per sparsity level (DESIGN.md section 2):

- ``H_upper``: the upper triangle of the layer's Hessian per group (float64), which the
  least-squares re-fit of a pruning level needs;
- per pruning structure (unstructured, N:M, block:c) the greedy ExactOBS record: the elimination
  order (int16 where the columns allow) and the loss of every step (float32); any level's mask is
  assembled from it and its weights re-fitted on demand;
- per quantized variant (dense or on a pruning level's mask: joint OBC) the OBQ codes, bit-packed
  (of the kept weights only, with a bitmask, for a joint variant), and the per-row grid (scale,
  zero point).

Its JSON metadata lists every variant with its layer loss ``1/2 tr(dW H' dW^T)`` with H' the H the
solvers used: H itself where it is positive definite (then this is the measured loss of the
variant's weights), H + lambda mean(diag H) I where it needed dampening (``damp`` records lambda;
the loss is then an upper bound of the measured one by 1/2 lambda mean(diag H) ||dW||^2). For a
pruning level it is the sum of the greedy steps' losses, which needs no re-fit. The normalised
error is ``loss / (1/2 tr(W H W^T))``, i.e. ``||(W - W')X||^2 / ||WX||^2`` when undamped.

``database.json`` keys the whole on (layer names and shapes, a hash of every layer's weights, a
hash of the calibration inputs, the space and settings). A layer file is written atomically
(temporary file, then rename) once the layer is finished and names its own key, so an interrupted
build resumes at the first missing layer and gives the same files; a directory that holds a
database of another model or calibration set is refused.

Memory while building: the Hessians of the layers still to build (one pass over the calibration
data, as ``compress``), one layer's records, and the solver's working set.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save

from .._locks import directory_lock
from .._progress import progress_bar
from ..files import write_bytes, write_json
from ..formats.packing import pack_bits, pack_mask, unpack_bits, unpack_mask
from ..model.calibration import HessianHooks, calibration_batches, count_samples, run_model
from ..model.layers import LayerInfo, find_layers, set_weight_groups, weight_groups
from ..solvers import QuantGrid, layer_loss, obq_quantize, parse_mask_structure, prepare_layer, support_refit
from ..solvers.obs import ObsDatabase, exact_obs_database
from .space import LayerGeometry, SearchSpace, Variant, configuration_recipe, default_space

__all__ = ["Database", "LayerEntry", "build_database", "load_database", "record_passes", "DATABASE_FORMAT",
           "DATABASE_VERSION"]

DATABASE_FORMAT = "obcompress-database"
DATABASE_VERSION = 1
MANIFEST = "database.json"
LAYER_DIR = "layers"


# --------------------------------------------------------------------------------------------
# hashing


def _tensor_digest(h, t: torch.Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    h.update(str(tuple(t.shape)).encode())
    h.update(str(t.dtype).encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def _digest_inputs(h, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        _tensor_digest(h, obj)
    elif isinstance(obj, Mapping):
        for k in sorted(obj, key=str):
            h.update(str(k).encode())
            _digest_inputs(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for v in obj:
            _digest_inputs(h, v)
        h.update(b"]")
    else:
        h.update(repr(obj).encode())


def calibration_hash(batches: Sequence[Any]) -> str:
    h = hashlib.sha256()
    for b in batches:
        _digest_inputs(h, b)
    return h.hexdigest()


def weight_hash(info: LayerInfo) -> str:
    h = hashlib.sha256()
    _tensor_digest(h, weight_groups(info))
    return h.hexdigest()


def _safe_name(name: str) -> str:
    keep = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
    return f"{keep}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


# --------------------------------------------------------------------------------------------
# one layer


@dataclass
class LayerEntry:
    """What the database knows of one layer (its metadata; tensors stay on disk until asked for)."""

    name: str
    geometry: LayerGeometry
    key: str
    weight_hash: str
    variants: "OrderedDict[str, Dict[str, Any]]"  # variant key -> {loss, error, seconds, method}
    dense_energy: float  # 1/2 tr(W H W^T): the loss of the all-zero layer
    damp: Dict[str, List[float]]  # structure -> dampening used per group
    file: Path
    seconds: float = 0.0

    def options(self) -> List[Variant]:
        return [Variant.from_key(k) for k in self.variants]

    def score(self, key: str, kind: str = "error") -> float:
        v = self.variants[key]
        if kind not in v:
            raise ValueError(f"layer {self.name}: no {kind!r} score for variant {key} (have {sorted(v)})")
        return float(v[kind])


def _tag(key: str) -> str:
    """A variant key or structure as a tensor-name part."""
    return key.replace(":", "_").replace("@", "_")


def _order_dtype(cols: int) -> torch.dtype:
    return torch.int16 if cols < 2**15 else torch.int32


def _build_layer(name: str, Wg: torch.Tensor, H: torch.Tensor, kind: str, taps: int, has_bias: bool,
                 space: SearchSpace, positions: float, whash: str, key: str) -> tuple:
    """Compute every variant of one layer from its weight groups (groups, rows, cols) and H:
    (tensors to store, metadata). Pure tensors in and out: an executor job (it writes nothing)."""
    t_start = time.perf_counter()
    Hg = H if H.dim() == 3 else H.unsqueeze(0)
    G, R, C = Wg.shape
    columns_last = taps if taps > 1 else None
    options = space.for_layer(C)
    # H is symmetric: its upper triangle (float64, the re-fit's precision) is half the bytes.
    iu = torch.triu_indices(C, C)
    tensors: Dict[str, torch.Tensor] = {"H_upper": Hg.to(torch.float64)[:, iu[0], iu[1]].contiguous()}
    variants: "OrderedDict[str, Dict[str, Any]]" = OrderedDict()
    damp: Dict[str, List[float]] = {}
    energy = sum(layer_loss(Wg[g], torch.zeros_like(Wg[g]), Hg[g]) for g in range(G))
    denom = energy if energy > 0 else 1.0

    def record(v: Variant, loss: float, seconds: float, method: str, damp: float = 0.0) -> None:
        variants[v.key] = {"loss": float(loss), "error": float(loss) / denom, "seconds": seconds, "method": method,
                           "damp": float(damp)}

    record(Variant(), 0.0, 0.0, "dense")
    # Pruning records, one per structure the space uses and this layer admits.
    dbs: Dict[str, List[ObsDatabase]] = {}
    for structure in space.structures:
        try:
            parse_mask_structure(structure, C)
        except ValueError:
            continue  # N:M or blocks that do not divide this layer's columns
        t0 = time.perf_counter()
        try:
            per_group = [exact_obs_database(Wg[g], Hg[g], structure, columns_last=columns_last, damp=space.damp)
                         for g in range(G)]
        except ValueError as e:
            raise ValueError(f"layer {name}: {structure} pruning: {e}") from None
        dbs[structure] = per_group
        dt = time.perf_counter() - t0
        tag = _tag(structure)
        tensors[f"order.{tag}"] = torch.stack([d.order for d in per_group]).to(_order_dtype(C)).contiguous()
        tensors[f"losses.{tag}"] = torch.stack([d.losses for d in per_group]).to(torch.float32).contiguous()
        damp[structure] = [float(d.damp) for d in per_group]
        for v in options:
            if v.structure == structure and v.pruned and v.bits is None:
                # The greedy steps' losses add up to the re-fitted level's loss w.r.t. the H the
                # solver used: no re-fit per level is needed.
                t1 = time.perf_counter()
                s = None if v.kind == "nm" else v.sparsity
                record(v, sum(d.predicted_loss(s) for d in per_group), dt + time.perf_counter() - t1, "exact_obs",
                       max(d.damp for d in per_group))

    # Quantized variants: OBQ on the dense layer or on a pruning level's support (joint OBC), the
    # grid fitted on the dense weight, as ``compress`` does. A support's least-squares re-fit is
    # the same for every bit width: computed once per (level, group).
    refits: Dict[tuple, torch.Tensor] = {}
    for v in options:
        if v.bits is None:
            continue
        t0 = time.perf_counter()
        codes, scales, zeros, masks, loss, damp_used = [], [], [], [], 0.0, 0.0
        for g in range(G):
            mask = None
            if v.pruned:
                d = dbs[v.structure][g]
                mask = d.keep_mask(None if v.kind == "nm" else v.sparsity)
                masks.append(mask)
            grid = QuantGrid.fit(Wg[g], v.bits, symmetric=space.symmetric, strategy="channel")
            try:
                refit = None
                if mask is not None:
                    rk = (v.structure, v.sparsity, g)
                    if rk not in refits:
                        refits[rk] = support_refit(Wg[g], Hg[g], mask, damp=space.damp)
                    refit = refits[rk]
                res = obq_quantize(Wg[g], Hg[g], grid, mask=mask, damp=space.damp, refit=refit)
            except ValueError as e:
                where = f"layer {name}" + (f" (group {g})" if G > 1 else "")
                raise ValueError(f"{where}: variant {v.key}: {e}") from None
            codes.append(grid.encode(res.weight))
            scales.append(grid.scale)
            zeros.append(grid.zero)
            # Every variant's loss is w.r.t. the H its solver used, as for the pruning levels.
            if res.damp > 0:
                prep = prepare_layer(Wg[g], Hg[g], res.damp, inverse=False)
                loss += layer_loss(prep.W, res.weight.to(torch.float64), prep.H)
            else:
                loss += res.loss
            damp_used = max(damp_used, res.damp)
        tag = _tag(v.key)
        stacked = torch.stack(codes)
        if v.pruned:
            # Pruned weights need no code: the mask (1 bit) and the kept codes are smaller.
            keep = torch.stack(masks)
            tensors[f"mask.{tag}"] = pack_mask(keep)
            stacked = stacked[keep]
        tensors[f"codes.{tag}"] = pack_bits(stacked.flatten(), v.bits)
        tensors[f"scale.{tag}"] = torch.stack(scales).to(torch.float32).contiguous()
        tensors[f"zero.{tag}"] = torch.stack(zeros).to(torch.float32).contiguous()
        record(v, loss, time.perf_counter() - t0, "obq" if not v.pruned else "obs+obq", damp_used)

    geometry = LayerGeometry(name=name, kind=kind, groups=G, rows=R, cols=C, taps=taps,
                             positions=float(positions), has_bias=has_bias)
    meta = {
        "format": DATABASE_FORMAT, "version": DATABASE_VERSION, "name": name, "key": key, "weight_hash": whash,
        "geometry": geometry.to_dict(), "variants": variants, "dense_energy": energy, "damp": damp,
        "seconds": time.perf_counter() - t_start,
    }
    return tensors, meta


def _layer_digest(header: Dict[str, Any], data: Iterable[bytes], meta: Dict[str, Any]) -> str:
    """SHA-256 of a layer file's content: its tensor table (names, dtypes, shapes, offsets), its
    metadata without the digest itself, and every byte of its tensor data."""
    h = hashlib.sha256()
    table = {k: v for k, v in header.items() if k != "__metadata__"}
    h.update(json.dumps(table, sort_keys=True).encode())
    h.update(json.dumps({k: v for k, v in meta.items() if k != "sha256"}, sort_keys=True).encode())
    for chunk in data:
        h.update(chunk)
    return h.hexdigest()


def _split_safetensors(raw: bytes):
    """(header dict, data bytes) of a safetensors file's content."""
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write_layer(path: Path, tensors: Dict[str, torch.Tensor], meta: Dict[str, Any]) -> None:
    """Write a layer file atomically, its metadata carrying the SHA-256 of its whole content."""
    # The tensor table and data do not depend on the metadata: lay the file out once to hash it.
    header, data = _split_safetensors(save(tensors, metadata={"obcompress": json.dumps(meta)}))
    meta = dict(meta, sha256=_layer_digest(header, [data], meta))
    write_bytes(path, save(tensors, metadata={"obcompress": json.dumps(meta)}))


class CorruptLayerFile(ValueError):
    """A layer file whose content no longer matches the SHA-256 written with it."""


def _read_layer_meta(path: Path, verify: bool = False) -> Optional[Dict[str, Any]]:
    """The layer file's metadata, or None when it is missing or unreadable (a build will redo it).

    ``verify``: also check the file's SHA-256 against its content (reads the whole file) and raise
    ``CorruptLayerFile`` on a mismatch. Files written before checksums existed pass unverified."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("obcompress")
        meta = json.loads(raw) if raw else None
    except Exception:
        return None
    if not isinstance(meta, dict) or meta.get("format") != DATABASE_FORMAT:
        return None
    if verify and "sha256" in meta:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
            digest = _layer_digest(header, iter(lambda: f.read(1 << 22), b""), meta)
        if digest != meta["sha256"]:
            raise CorruptLayerFile(
                f"layer {meta.get('name')}: database file {path} is corrupted (its content does not match the "
                "SHA-256 written with it): rebuild that layer by running `obcompress search build` again with "
                "the same arguments (it redoes corrupted layers only), or `build_database(...)` in Python")
    return meta


def _entry(meta: Dict[str, Any], path: Path) -> LayerEntry:
    return LayerEntry(
        name=meta["name"], geometry=LayerGeometry.from_dict(meta["geometry"]), key=meta["key"],
        weight_hash=meta["weight_hash"], variants=OrderedDict(meta["variants"]),
        dense_energy=float(meta["dense_energy"]), damp=meta["damp"], file=path, seconds=float(meta.get("seconds", 0.0)),
    )


# --------------------------------------------------------------------------------------------
# the database


class Database:
    """A model's database on disk: ``layers`` (name -> LayerEntry) in model order, plus settings."""

    def __init__(self, directory: Path, manifest: Dict[str, Any], layers: "OrderedDict[str, LayerEntry]"):
        self.directory = Path(directory)
        self.manifest = manifest
        self.layers = layers
        self.space = SearchSpace.from_dict(manifest["space"])
        self._tensor_cache: Dict[str, Dict[str, torch.Tensor]] = {}
        self._obs_cache: Dict[str, Dict[str, List[ObsDatabase]]] = {}
        # Where ``weights_many`` rebuilds variants (None: here); see ``use_executor``.
        self.executor = None
        self._load_scores()

    def use_executor(self, executor: Any = None, ray_address: Optional[str] = None) -> "Database":
        """Rebuild variants in ``weights_many`` (stitching a configuration, SPDY, sweeps) as executor
        jobs, one per layer: "local", "ray" or an ``Executor`` (see ``obcompress.executor``)."""
        from ..executor import make_executor

        self.executor = make_executor(executor, ray_address)
        return self

    # ---- extra per-variant scores (e.g. the calibration-loss increase of a single-layer swap) ----

    def _scores_path(self, kind: str) -> Path:
        if not kind.replace("_", "").isalnum():
            raise ValueError(f"a score name is letters, digits and _, got {kind!r}")
        return self.directory / f"scores_{kind}.json"

    def _load_scores(self) -> None:
        for path in sorted(self.directory.glob("scores_*.json")):
            kind = path.stem[len("scores_"):]
            try:
                doc = json.loads(path.read_text())
            except Exception:
                continue
            for name, rec in doc.items():
                e = self.layers.get(name)
                # Scores of another build of this layer (other weights, data or space) are ignored.
                if e is None or rec.get("key") != e.key:
                    continue
                for k, val in rec["scores"].items():
                    if k in e.variants:
                        e.variants[k][kind] = float(val)

    def save_scores(self, kind: str, scores: Mapping[str, Mapping[str, float]]) -> None:
        """Record per-variant scores of some layers under ``kind`` (merged into scores_<kind>.json,
        written atomically, tied to each layer's build key)."""
        path = self._scores_path(kind)
        doc = json.loads(path.read_text()) if path.exists() else {}
        for name, sc in scores.items():
            e = self._layer(name)
            unknown = [k for k in sc if k not in e.variants]
            if unknown:
                raise ValueError(f"layer {name}: scores for variants not in the database: {unknown[:3]}")
            rec = doc.get(name) if isinstance(doc.get(name), dict) and doc[name].get("key") == e.key else None
            merged = dict(rec["scores"]) if rec else {}
            merged.update({k: float(v) for k, v in sc.items()})
            doc[name] = {"key": e.key, "scores": merged}
            for k, v in sc.items():
                e.variants[k][kind] = float(v)
        write_json(path, doc, indent=1, sort_keys=True)

    # ---- facts -------------------------------------------------------------------------

    @property
    def names(self) -> List[str]:
        return list(self.layers)

    @property
    def geometries(self) -> "OrderedDict[str, LayerGeometry]":
        return OrderedDict((n, e.geometry) for n, e in self.layers.items())

    @property
    def nbytes(self) -> int:
        """Bytes on disk: the manifest and every layer file."""
        total = (self.directory / MANIFEST).stat().st_size
        return total + sum(e.file.stat().st_size for e in self.layers.values())

    @property
    def build_seconds(self) -> float:
        return float(self.manifest.get("hessian_seconds", 0.0)) + sum(e.seconds for e in self.layers.values())

    def options(self, name: str) -> List[Variant]:
        return self._layer(name).options()

    def scores(self, name: str, kind: str = "error") -> List[float]:
        e = self._layer(name)
        return [e.score(k, kind) for k in e.variants]

    def _layer(self, name: str) -> LayerEntry:
        if name not in self.layers:
            raise ValueError(f"layer {name}: not in the database at {self.directory} (it has {len(self.layers)} layers)")
        return self.layers[name]

    # ---- rebuilding variants -----------------------------------------------------------

    def _tensors(self, name: str) -> Dict[str, torch.Tensor]:
        if name not in self._tensor_cache:
            e = self._layer(name)
            out = {}
            with safe_open(str(e.file), framework="pt") as f:
                for k in f.keys():
                    out[k] = f.get_tensor(k)
            self._tensor_cache[name] = out
        return self._tensor_cache[name]

    def hessian(self, name: str) -> torch.Tensor:
        """The layer's H per group, (groups, cols, cols) float64, as the build used it."""
        return _full_hessian(self._tensors(name)["H_upper"], self._layer(name).geometry.cols)

    def _variant(self, name: str, variant: Union[Variant, str], dense_weight: torch.Tensor) -> Variant:
        """The variant, checked to be in the layer's database and to fit ``dense_weight``."""
        e = self._layer(name)
        v = variant if isinstance(variant, Variant) else Variant.from_key(variant)
        if v.key not in e.variants:
            raise ValueError(f"layer {name}: variant {v.key} is not in the database (not in the space, or its "
                             "shape does not admit it)")
        g = e.geometry
        if tuple(dense_weight.shape) != (g.groups, g.rows, g.cols):
            raise ValueError(f"layer {name}: weight of shape {tuple(dense_weight.shape)}, the database has "
                             f"{(g.groups, g.rows, g.cols)}")
        return v

    def weights(self, name: str, variant: Union[Variant, str], dense_weight: torch.Tensor) -> torch.Tensor:
        """The layer's weights in ``variant``, (groups, rows, cols) float32. ``dense_weight``: the
        layer's original ``weight_groups`` (the database keeps no copy of the weights)."""
        v = self._variant(name, variant, dense_weight)
        e = self._layer(name)
        return _rebuild(name, e.geometry, e.damp, self._tensors(name), v, dense_weight,
                        self._obs_cache.setdefault(name, {}))

    def weights_many(self, requests: Mapping[str, Sequence[Union[Variant, str]]],
                     dense: Mapping[str, torch.Tensor]) -> Dict[Tuple[str, str], torch.Tensor]:
        """``{(layer, variant key): weights}`` for every variant in ``requests`` (layer -> variants),
        ``dense`` giving each layer's dense weight groups. With an executor other than local (see
        ``use_executor``), one job per layer rebuilds its variants (its records and dense weight
        travel to the worker; nothing is written); else as ``weights`` one by one."""
        checked = {n: [self._variant(n, v, dense[n]) for v in vs] for n, vs in requests.items() if vs}
        if self.executor is None or self.executor.kind == "local" or len(checked) < 2:
            return {(n, v.key): self.weights(n, v, dense[n]) for n, vs in checked.items() for v in vs}
        from ..executor import LayerJob

        jobs = []
        for name, vs in checked.items():
            e = self._layer(name)
            t = self._tensors(name)
            need = {"H_upper"} if any(v.bits is None and v.pruned for v in vs) else set()
            for v in vs:
                tag = _tag(v.structure if v.bits is None else v.key)
                need |= {k for k in t if k.endswith("." + tag)}
            jobs.append(LayerJob(name, _rebuild_job, (name, e.geometry, e.damp, {k: t[k] for k in need},
                                                      [v.key for v in vs], dense[name].cpu())))
        out: Dict[Tuple[str, str], torch.Tensor] = {}
        for i, rebuilt in self.executor.run(jobs):
            out.update({(jobs[i].name, k): w for k, w in rebuilt.items()})
        return out

    def apply(self, model: nn.Module, choice: Mapping[str, Union[Variant, str]],
              originals: Optional[Mapping[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
        """Write the chosen variants' weights into ``model`` (in place). Returns the dense weight
        groups of the layers it changed, which ``originals`` may pass back in later calls (so that a
        search can stitch many configurations into one model without keeping a dense copy)."""
        found = find_layers(model, list(choice), ())
        originals = dict(originals or {})
        for name in choice:
            if name not in originals:
                originals[name] = weight_groups(found[name])
        keys = {n: (v if isinstance(v, Variant) else Variant.from_key(v)).key for n, v in choice.items()}
        rebuilt = self.weights_many({n: [k] for n, k in keys.items()}, originals)
        for name, key in keys.items():
            set_weight_groups(found[name], rebuilt[(name, key)])
        return originals

    def recipe(self, choice: Mapping[str, Union[Variant, str]], *, activation_bits: Optional[int] = None,
               base: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
        """A recipe dict that ``compress`` applies unchanged to produce ``choice`` (every layer named,
        solver exact); dense choices are left out of the targets."""
        for name in choice:
            self._layer(name)
        out: Dict[str, Any] = dict(base or {})
        out.update(configuration_recipe(choice, activation_bits=activation_bits, damp=self.space.damp,
                                        symmetric=self.space.symmetric))
        return out


# --------------------------------------------------------------------------------------------
# rebuilding a variant from a layer's records (pure: also an executor job)


def _full_hessian(upper: torch.Tensor, cols: int) -> torch.Tensor:
    iu = torch.triu_indices(cols, cols)
    H = torch.zeros(upper.shape[0], cols, cols, dtype=torch.float64)
    H[:, iu[0], iu[1]] = upper
    H[:, iu[1], iu[0]] = upper
    return H


def _rebuild(name: str, g: LayerGeometry, damp: Mapping[str, List[float]], t: Mapping[str, torch.Tensor],
             v: Variant, dense_weight: torch.Tensor, obs: Dict[str, List[ObsDatabase]]) -> torch.Tensor:
    """A variant's weights (groups, rows, cols) float32 from the layer's stored tensors ``t``;
    ``obs`` caches the restored pruning records per structure (their re-fits share a factorization)."""
    if v == Variant():
        return dense_weight.clone()
    if v.bits is None:
        if v.structure not in obs:
            tag = _tag(v.structure)
            if f"order.{tag}" not in t:
                raise ValueError(f"layer {name}: the database has no {v.structure} pruning record")
            H = _full_hessian(t["H_upper"], g.cols)
            cl = g.taps if g.taps > 1 else None
            obs[v.structure] = [
                ObsDatabase.restore(dense_weight[k], H[k], v.structure, t[f"order.{tag}"][k].to(torch.int32),
                                    t[f"losses.{tag}"][k], damp[v.structure][k], columns_last=cl)
                for k in range(dense_weight.shape[0])
            ]
        s = None if v.kind == "nm" else v.sparsity
        return torch.stack([d.at(s).weight for d in obs[v.structure]]).to(torch.float32)
    tag = _tag(v.key)
    n = g.groups * g.rows * g.cols
    scale, zero = t[f"scale.{tag}"], t[f"zero.{tag}"]  # (groups, rows, 1): per-channel grids
    if v.pruned:
        keep = unpack_mask(t[f"mask.{tag}"], (g.groups, g.rows, g.cols))
        # A pruned weight's code is the grid's zero point: it decodes to exactly 0.
        codes = zero.round().to(torch.uint8).expand(g.groups, g.rows, g.cols).clone()
        codes[keep] = unpack_bits(t[f"codes.{tag}"], v.bits, int(keep.sum()))
    else:
        codes = unpack_bits(t[f"codes.{tag}"], v.bits, n).reshape(g.groups, g.rows, g.cols)
    # Per-row grids of every group at once: QuantGrid.decode's formula, broadcast over groups.
    return scale * (codes.to(torch.float32) - zero)


def _rebuild_job(name: str, g: LayerGeometry, damp: Mapping[str, List[float]], t: Mapping[str, torch.Tensor],
                 keys: Sequence[str], dense_weight: torch.Tensor) -> Dict[str, torch.Tensor]:
    obs: Dict[str, List[ObsDatabase]] = {}
    return {k: _rebuild(name, g, damp, t, Variant.from_key(k), dense_weight, obs) for k in keys}


# --------------------------------------------------------------------------------------------
# build / load


def _check_dir_for(directory: Path, manifest: Dict[str, Any], overwrite: bool) -> None:
    path = directory / MANIFEST
    if not path.exists():
        return
    try:
        old = json.loads(path.read_text())
    except Exception:
        raise ValueError(f"{path} is not a readable database manifest; remove it or pass overwrite=True") from None
    if old.get("format") != DATABASE_FORMAT:
        raise ValueError(f"{directory} holds something that is not an obcompress database")
    same = all(old.get(k) == manifest[k] for k in ("version", "model", "calibration", "space", "settings"))
    if same:
        return
    if not overwrite:
        why = [k for k in ("version", "model", "calibration", "space", "settings") if old.get(k) != manifest[k]]
        raise ValueError(
            f"{directory} holds a database of another {' / '.join(why)}: refusing to mix them "
            "(use another directory, or overwrite=True / --overwrite to replace it)")
    for f in (directory / LAYER_DIR).glob("*.safetensors"):
        f.unlink()


def build_database(
    model: nn.Module,
    dataset: Iterable,
    directory: Union[str, os.PathLike],
    space: Optional[SearchSpace] = None,
    *,
    num_calibration_samples: int = 256,
    transform_fn: Optional[Callable] = None,
    targets: Optional[Sequence[str]] = None,
    ignore: Sequence[str] = (),
    overwrite: bool = False,
    progress: bool = True,
    stop_after: Optional[int] = None,
    executor: Any = None,
    ray_address: Optional[str] = None,
) -> Database:
    """Build (or resume) the database of ``model``'s layers under ``directory``.

    ``stop_after``: finish at most this many layers in this call (for time-sliced builds: call
    again to go on). The model is not modified. A second build on the same directory while one
    runs is refused with a ``ValueError``. ``executor``: "local" (default) or "ray" (each layer's
    records a Ray task; ``ray_address`` joins a cluster) or an ``Executor``; either way this
    process alone writes the layer files, each atomically as its records arrive, so an interrupted
    build resumes with the layers not yet written, and the workers need no access to ``directory``.
    """
    space = space or default_space()
    directory = Path(directory)
    found = find_layers(model, targets, ignore)
    batches = calibration_batches(dataset, num_calibration_samples, transform_fn)
    n_samples = sum(count_samples(b) for b in batches)
    hashes = {name: weight_hash(info) for name, info in found.items()}
    manifest = {
        "format": DATABASE_FORMAT,
        "version": DATABASE_VERSION,
        "model": {name: {"shape": [info.groups, info.rows, info.cols], "weight_hash": hashes[name]}
                  for name, info in found.items()},
        "calibration": {"samples": n_samples, "hash": calibration_hash(batches)},
        "space": space.to_dict(),
        "settings": {"targets": None if targets is None else list(targets), "ignore": list(ignore)},
    }
    directory.mkdir(parents=True, exist_ok=True)
    # One build per database at a time: a second one would redo the same layers (and could
    # replace files under the first). It is refused at once, not queued behind a long build.
    with directory_lock(directory, wait=False, what=f"the database at {directory} (another `search build`?)"):
        return _build_locked(model, directory, manifest, found, hashes, batches, n_samples, space, overwrite,
                             progress, stop_after, executor, ray_address)


def _build_locked(model, directory, manifest, found, hashes, batches, n_samples, space, overwrite, progress,
                  stop_after, executor, ray_address) -> "Database":
    from ..executor import LayerJob, format_seconds, make_executor
    from ..jobs import estimate_seconds

    _check_dir_for(directory, manifest, overwrite)
    pool = make_executor(executor, ray_address)
    (directory / LAYER_DIR).mkdir(exist_ok=True)

    def layer_key(name: str) -> str:
        h = hashlib.sha256()
        h.update(json.dumps([name, hashes[name], manifest["calibration"], manifest["space"], DATABASE_VERSION],
                            sort_keys=True).encode())
        return h.hexdigest()

    paths = {name: directory / LAYER_DIR / f"{_safe_name(name)}.safetensors" for name in found}
    done = {}
    for name in found:
        try:
            meta = _read_layer_meta(paths[name], verify=True)
        except CorruptLayerFile as e:
            warnings.warn(f"{e}; rebuilding it now")
            continue
        if meta is not None and meta.get("key") == layer_key(name):
            done[name] = meta
    todo = [n for n in found if n not in done]
    if stop_after is not None:
        todo = todo[: max(0, int(stop_after))]
    old_manifest = {}
    if (directory / MANIFEST).exists():
        old_manifest = json.loads((directory / MANIFEST).read_text())
    manifest["hessian_seconds"] = float(old_manifest.get("hessian_seconds", 0.0))
    write_json(directory / MANIFEST, manifest, indent=1, sort_keys=True)

    if todo:
        t0 = time.perf_counter()
        layers = {n: found[n] for n in todo}
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            with HessianHooks(layers) as hooks, torch.no_grad():
                for batch in batches:
                    hooks.begin_batch()  # layers fed one tensor then share one accumulator
                    run_model(model, batch)
            hessians = hooks.hessians()
            counts = hooks.nsamples()
        finally:
            for m, training in modes:
                m.training = training
        manifest["hessian_seconds"] += time.perf_counter() - t0
        write_json(directory / MANIFEST, manifest, indent=1, sort_keys=True)
        jobs = []
        for name in todo:
            info = found[name]
            if counts[name] == 0:
                raise ValueError(f"layer {name}: the model never called it on the calibration data")
            Wg = weight_groups(info)
            passes = record_passes(space, info.cols)
            jobs.append(LayerJob(name, _build_layer, (
                name, Wg.cpu(), hessians.pop(name).cpu(), info.kind, info.taps,
                getattr(info.module, "bias", None) is not None, space, counts[name] / n_samples, hashes[name],
                layer_key(name)), estimate=estimate_seconds(passes, tuple(Wg.shape))))
        del hessians
        total = sum(j.estimate for j in jobs)
        if progress and total > 60:
            print(f"database: {len(jobs)} layers, about {format_seconds(total)} of exact solves at this "
                  f"machine's measured rate; executor {pool.describe()}", file=sys.stderr)
        bar = progress_bar(total=len(jobs), desc="database", unit="layer", progress=progress)
        # This process is the one writer: each layer file as its records arrive, atomically.
        for i, (tensors, meta) in pool.run(jobs):
            name = jobs[i].name
            _write_layer(paths[name], tensors, meta)
            done[name] = meta
            bar.update(1)
            bar.set_postfix_str(f"{name}: {len(meta['variants'])} variants, {meta['seconds']:.1f} s")
        bar.close()
    return _assemble(directory, manifest, found, done, paths)


def record_passes(space: SearchSpace, cols: int) -> int:
    """The exact greedy passes one layer's record runs (per group): an ExactOBS pass per mask
    structure the layer's ``cols`` admit, an OBQ pass per quantized variant."""
    return sum(1 for st in space.structures if _admits(st, cols)) + sum(
        1 for v in space.for_layer(cols) if v.bits is not None)


def _admits(structure: str, cols: int) -> bool:
    try:
        parse_mask_structure(structure, cols)
    except ValueError:
        return False
    return True


def _assemble(directory, manifest, found_names, done, paths) -> Database:
    layers = OrderedDict((n, _entry(done[n], paths[n])) for n in found_names if n in done)
    return Database(directory, manifest, layers)


def load_database(directory: Union[str, os.PathLike], model: Optional[nn.Module] = None,
                  *, complete: bool = True, executor: Any = None, ray_address: Optional[str] = None) -> Database:
    """Open a database. With ``model``, refuse it unless it was built from these very weights
    (names, shapes and weight hashes of its layers). ``complete``: refuse a database whose build
    has not finished every layer. Every layer file's SHA-256 is checked (one read of the files):
    a corrupted one raises a ``ValueError`` that names it and says to rebuild that layer.
    ``executor`` / ``ray_address``: where stitching rebuilds variants (``Database.use_executor``)."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.exists():
        raise ValueError(f"{directory} is not an obcompress database (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except Exception as e:
        raise ValueError(f"{path}: unreadable database manifest ({e})") from None
    if manifest.get("format") != DATABASE_FORMAT:
        raise ValueError(f"{directory} is not an obcompress database")
    if manifest.get("version") != DATABASE_VERSION:
        raise ValueError(f"{directory}: database version {manifest.get('version')}, this obcompress reads "
                         f"version {DATABASE_VERSION}: rebuild it")
    names = list(manifest["model"])
    if not names:
        raise ValueError(f"{directory}: the database has no layer")
    if model is not None:
        found = find_layers(model, None, ())
        for name, m in manifest["model"].items():
            info = found.get(name)
            if info is None:
                raise ValueError(f"the database at {directory} was built for another model: it has layer {name}, "
                                 "this model does not")
            if [info.groups, info.rows, info.cols] != m["shape"]:
                raise ValueError(f"the database at {directory} was built for another model: layer {name} has shape "
                                 f"{m['shape']} there, {[info.groups, info.rows, info.cols]} here")
            if weight_hash(info) != m["weight_hash"]:
                raise ValueError(f"the database at {directory} was built for other weights: layer {name} differs")
        # The model's order, as the build had it (the manifest's JSON keeps its names sorted).
        names = [n for n in found if n in manifest["model"]]
    paths = {name: directory / LAYER_DIR / f"{_safe_name(name)}.safetensors" for name in names}
    done = {}
    for name in names:
        meta = _read_layer_meta(paths[name], verify=True)
        if meta is not None and meta.get("weight_hash") == manifest["model"][name]["weight_hash"]:
            done[name] = meta
    missing = [n for n in names if n not in done]
    if missing and complete:
        raise ValueError(f"the database at {directory} is incomplete: {len(missing)} of {len(names)} layers missing "
                         f"(first: {missing[0]}); run the build again to resume it")
    return _assemble(directory, manifest, names, done, paths).use_executor(executor, ray_address)
