"""EfficientNet-Lite0 zoo model.

The tests on the real model and photos skip cleanly when the optional packages (pip install
'obcompress[zoo]') or the Debian package tuxpaint-stamps-default are unavailable. They use the normal
obcompress cache (set OBCOMPRESS_CACHE to move it): the first run downloads ~160 MB and caches the
224x224 images (~120 MB, ~20 s); later runs take ~10-20 s on 2 cores (two passes over 132 photos).
"""

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch

from obcompress.zoo import _fetch
from obcompress.zoo import efficientnet as E
from obcompress.zoo._fetch import MissingPackage, ZooUnavailable

SHARED_LABELS = Path(__file__).resolve().parents[3] / "shared" / "data" / "tuxpaint_imagenet.json"


def _make_deb(path: Path, files: dict) -> None:
    """A minimal Debian package: an ar archive whose data.tar.xz holds ``files``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo("./" + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    members = [("debian-binary", b"2.0\n"), ("control.tar.xz", b""), ("data.tar.xz", buf.getvalue())]
    with open(path, "wb") as f:
        f.write(b"!<arch>\n")
        for name, data in members:
            f.write(f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode())
            f.write(data + (b"\n" if len(data) % 2 else b""))


def test_labels_match_the_shared_label_file():
    assert len(E.TUXPAINT_LABELS) == 132
    assert all(ids and all(0 <= i < 1000 for i in ids) for ids in E.TUXPAINT_LABELS.values())
    if not SHARED_LABELS.exists():
        pytest.skip(f"{SHARED_LABELS} not present")
    assert E.TUXPAINT_LABELS == json.loads(SHARED_LABELS.read_text())


def test_read_members_from_a_deb_and_local_deb_dir(tmp_path, monkeypatch):
    # Odd-sized members check the ar padding; only the wanted files come back, without './'.
    _make_deb(tmp_path / "pkg_1.0_all.deb", {"usr/share/a.png": b"x" * 7, "usr/share/b.txt": b"yy"})
    monkeypatch.setenv("OBCOMPRESS_DEB_DIR", str(tmp_path))
    with _fetch.debian_package("pkg") as deb:
        assert deb == tmp_path / "pkg_1.0_all.deb"
        assert _fetch.read_members(deb, lambda p: p.endswith(".png")) == {"usr/share/a.png": b"x" * 7}
    (tmp_path / "bad_1_all.deb").write_bytes(b"not a deb")
    with _fetch.debian_package("bad") as deb, pytest.raises(ZooUnavailable, match="not a Debian package"):
        _fetch.read_members(deb, lambda p: True)


def test_no_apt_gives_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.delenv("OBCOMPRESS_DEB_DIR", raising=False)
    monkeypatch.setenv("OBCOMPRESS_CACHE", str(tmp_path))
    monkeypatch.setattr(_fetch.shutil, "which", lambda name: None)
    with pytest.raises(ZooUnavailable, match="apt-get is not available.*OBCOMPRESS_DEB_DIR"):
        with _fetch.debian_package("tuxpaint-stamps-default"):
            pass


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "efficientnet_lite_pytorch", None)
    with pytest.raises(MissingPackage, match=r"efficientnet-lite-pytorch.*pip install 'obcompress\[zoo\]'"):
        E.load_model()


def test_preprocess_composites_on_white_and_pads_to_square():
    Image = pytest.importorskip("PIL.Image")
    # A 40x20 RGBA stamp: left half opaque red, right half fully transparent.
    im = Image.new("RGBA", (40, 20), (0, 0, 0, 0))
    im.paste(Image.new("RGBA", (20, 20), (255, 0, 0, 255)), (0, 0))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    x = E.preprocess(buf.getvalue())
    assert x.shape == (3, 224, 224) and x.dtype == torch.uint8
    white = torch.tensor([255, 255, 255], dtype=torch.uint8)
    assert torch.equal(x[:, 5, 112], white)  # top padding band
    assert torch.equal(x[:, 112, 200], white)  # transparent part, composited on white
    assert torch.equal(x[:, 112, 50], torch.tensor([255, 0, 0], dtype=torch.uint8))
    scaled = E.normalize(torch.tensor([0, 127, 255], dtype=torch.uint8))
    assert torch.allclose(scaled, torch.tensor([-127 / 128, 0.0, 1.0]))


def test_check_disjoint_catches_names_and_pixels():
    a, b = torch.zeros(1, 3, 4, 4, dtype=torch.uint8), torch.ones(1, 3, 4, 4, dtype=torch.uint8)
    E.check_disjoint(a, ["x.png"], b, ["y.png"])
    with pytest.raises(AssertionError, match="overlap"):
        E.check_disjoint(a, ["x.png"], b, ["x.png"])
    with pytest.raises(AssertionError, match="pixels"):
        E.check_disjoint(a, ["x.png"], a.clone(), ["z.png"])


def test_evaluate_and_agreement_on_a_stand_in():
    # A "model" that predicts class 3 first, 5 second: label sets decide top-1 and top-5.
    class Fixed(torch.nn.Module):
        def forward(self, x):
            out = torch.zeros(x.shape[0], 1000)
            out[:, 3], out[:, 5] = 2.0, 1.0
            return out

    images = torch.zeros(4, 3, 8, 8)
    r = E.evaluate(Fixed(), images, [[3], [5], [3, 9], [999]], batch_size=3)
    assert r == {"top1": 0.5, "top5": 0.75}
    assert E.agreement(Fixed(), torch.tensor([3, 3, 5, 3]), images) == 0.75
    with pytest.raises(ValueError, match="labels"):
        E.evaluate(Fixed(), images, [[3]])


@pytest.fixture(scope="module")
def entry():
    from obcompress.zoo.registry import ZOO

    try:
        return ZOO["efficientnet-lite0"](num_calibration=64, batch_size=16)
    except ZooUnavailable as e:
        pytest.skip(f"efficientnet-lite0 unavailable: {e}")


def test_real_data_is_disjoint_and_preprocessed(entry):
    data = E.load_tuxpaint(64)
    assert data.images.shape == (132, 3, 224, 224) and len(data.labels) == 132
    assert data.calibration.shape == (64, 3, 224, 224)
    assert set(data.names).isdisjoint(data.calibration_names)
    assert float(data.images.min()) >= -127 / 128 and float(data.images.max()) <= 1.0
    assert [b.shape[0] for b in entry.calibration] == [16, 16, 16, 16]
    assert torch.equal(torch.cat(list(entry.calibration)), data.calibration)
    assert sum(p.numel() for p in entry.model.parameters()) == 4_652_008


def test_dense_figures_on_the_132_photos(entry):
    metrics = entry.evaluate(entry.model)
    # REFERENCE.md §3: 112/132 top-1 (84.8 %), 129/132 top-5 (97.7 %).
    assert metrics["top1"] == pytest.approx(112 / 132, abs=1.5 / 132)
    assert metrics["top5"] == pytest.approx(129 / 132, abs=1.5 / 132)
    assert metrics["agreement"] == 1.0
    assert not entry.model.training
