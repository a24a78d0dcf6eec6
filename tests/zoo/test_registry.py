import sys

import pytest
import torch

from obcompress.zoo import registry as R


@pytest.fixture
def cache(tmp_path_factory, monkeypatch):
    # The digits CNN is cached where tests/zoo/test_digits.py caches it, never in the user's cache.
    path = tmp_path_factory.getbasetemp() / "obcompress-cache"
    path.mkdir(exist_ok=True)
    monkeypatch.setenv("OBCOMPRESS_CACHE", str(path))
    return path


def test_zoo_names():
    assert set(R.ZOO) == {"digits-cnn", "efficientnet-lite0", "minilm"}


def test_digits_entry_with_training_calibration(cache):
    model, calib, evaluate, fisher_task = R.resolve("digits-cnn", num_calibration=300, batch_size=128)
    assert fisher_task is None  # its own logits serve a Fisher
    assert [b.shape[0] for b in calib] == [128, 128, 44]
    metrics = evaluate(model)
    assert set(metrics) == {"accuracy"} and metrics["accuracy"] > 0.9


FACTORY = """
import torch
from helper_mod import WIDTH  # a neighbour of the spec file is importable

def make(width=WIDTH):
    model = torch.nn.Linear(width, 2)
    calib = [torch.randn(4, width)]
    return model, calib, lambda m: {"n": float(m.in_features)}

def wrong():
    return torch.nn.Linear(2, 2), "text", None

not_callable = 3
"""


def test_load_spec_imports_a_file_and_calls_the_factory(tmp_path):
    (tmp_path / "helper_mod.py").write_text("WIDTH = 5\n")
    spec_file = tmp_path / "my_model.py"
    spec_file.write_text(FACTORY)
    entry = R.load_spec(f"{spec_file}:make")
    assert isinstance(entry.model, torch.nn.Linear) and entry.evaluate(entry.model) == {"n": 5.0}
    assert R.resolve(f"{spec_file}:make", width=3).model.in_features == 3
    assert str(tmp_path) not in sys.path


@pytest.mark.parametrize(
    "suffix, match",
    [
        (":wrong", "calibration data must be an iterable"),
        (":missing", "defines no 'missing'"),
        (":not_callable", "not a function"),
        ("", "path/to/file.py:factory"),
        (":", "function name after the colon"),
    ],
)
def test_load_spec_errors(tmp_path, suffix, match):
    (tmp_path / "helper_mod.py").write_text("WIDTH = 5\n")
    spec_file = tmp_path / "my_model.py"
    spec_file.write_text(FACTORY)
    with pytest.raises(ValueError, match=match):
        R.load_spec(f"{spec_file}{suffix}")


def test_bad_specs_and_names(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        R.load_spec(str(tmp_path / "nope.py") + ":f")
    with pytest.raises(ValueError, match="neither a file nor an importable module"):
        R.load_spec("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="unknown model 'resnet'.*digits-cnn"):
        R.resolve("resnet")
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    return 1, 2\n")
    with pytest.raises(ValueError, match="must return"):
        R.load_spec(f"{bad}:f")


def _zstd_deb(tmp_path):
    import shutil
    import subprocess

    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is not installed: cannot build a zstd .deb to read")
    root = tmp_path / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text("Package: obc-test\nVersion: 1.0\nArchitecture: all\n"
                                             "Maintainer: t <t@example.com>\nDescription: test\n")
    (root / "usr" / "share" / "obc").mkdir(parents=True)
    (root / "usr" / "share" / "obc" / "data.txt").write_text("hello from zstd")
    deb = tmp_path / "obc-test_1.0_all.deb"
    proc = subprocess.run(["dpkg-deb", "-Zzstd", "--root-owner-group", "-b", str(root), str(deb)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"this dpkg-deb cannot build zstd packages: {proc.stderr.strip()}")
    return deb


def test_a_zstd_compressed_deb_is_read(tmp_path):
    from obcompress.zoo._fetch import read_members

    deb = _zstd_deb(tmp_path)
    members = read_members(deb, lambda name: name.endswith("data.txt"))
    assert members == {"usr/share/obc/data.txt": b"hello from zstd"}


def test_without_dpkg_or_zstandard_the_error_says_what_to_install(tmp_path, monkeypatch):
    import builtins
    import shutil

    from obcompress.zoo import ZooUnavailable
    from obcompress.zoo._fetch import read_members

    deb = _zstd_deb(tmp_path)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    real_import = builtins.__import__

    def no_zstandard(name, *a, **k):
        if name == "zstandard":
            raise ImportError("no zstandard")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_zstandard)
    with pytest.raises(ZooUnavailable, match=r"zstd: install Debian.s dpkg \(dpkg-deb\) or .pip install zstandard."):
        read_members(deb, lambda name: True)
