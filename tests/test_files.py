import json
import os
import stat
from pathlib import Path

import pytest

from obcompress.files import atomic_directory, atomic_path, cache_dir, write_bytes, write_json, write_text

SRC = Path(__file__).resolve().parents[1] / "src" / "obcompress"


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_files_get_the_permissions_open_gives_them(tmp_path, umask):
    reference = tmp_path / "plain"
    with open(reference, "w") as f:
        f.write("x")
    out = write_text(tmp_path / "sub" / "a.txt", "hello")
    assert out.read_text() == "hello"
    assert _mode(out) == _mode(reference) == 0o666 & ~umask
    with atomic_path(tmp_path / "b.bin") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".b.bin.") and tmp.stat().st_size == 0
        tmp.write_bytes(b"\x00\x01")
    assert _mode(tmp_path / "b.bin") == 0o666 & ~umask
    with atomic_directory(tmp_path / "art") as d:
        (d / "x").write_bytes(b"1")
    assert _mode(tmp_path / "art") == 0o777 & ~umask
    assert _mode(tmp_path / "art" / "x") == 0o666 & ~umask


def test_replace_is_whole_and_a_failure_leaves_the_old_file_and_no_temporary(tmp_path):
    target = write_json(tmp_path / "d.json", {"a": 1}, indent=1, sort_keys=True)
    assert json.loads(target.read_text()) == {"a": 1} and target.read_text() == '{\n "a": 1\n}'
    write_bytes(target, b"[2]")
    assert target.read_bytes() == b"[2]"
    for error in (ValueError("bad"), KeyboardInterrupt()):
        with pytest.raises(type(error)):
            with atomic_path(target) as tmp:
                tmp.write_bytes(b"half")
                raise error
        assert target.read_bytes() == b"[2]"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["d.json"]
    # a writer that removed or renamed its temporary itself: still no error about it
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "e") as tmp:
            tmp.unlink()
            raise RuntimeError("compiler failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.json"]


def test_atomic_directory_replaces_the_old_one_or_leaves_it(tmp_path):
    with atomic_directory(tmp_path / "art") as d:
        (d / "a").write_text("1")
    with atomic_directory(tmp_path / "art") as d:
        (d / "b").write_text("2")
    assert sorted(p.name for p in (tmp_path / "art").iterdir()) == ["b"]
    with pytest.raises(OSError):
        with atomic_directory(tmp_path / "art") as d:
            (d / "c").write_text("3")
            raise OSError("disk full")
    assert sorted(p.name for p in (tmp_path / "art").iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("OBCOMPRESS_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
    assert cache_dir() == tmp_path / "a"
    monkeypatch.delenv("OBCOMPRESS_CACHE")
    assert cache_dir() == tmp_path / "b" / "obcompress"


def test_every_writer_goes_through_this_module():
    # One way to write a file: no other module renames temporaries over targets by hand.
    offenders = []
    for p in SRC.rglob("*.py"):
        if p.name == "files.py" and p.parent == SRC:
            continue
        text = p.read_text(encoding="utf-8")
        for needle in ("mkstemp(", "mkdtemp(", "os.replace(", "os.rename(", "os.chmod("):
            if needle in text:
                offenders.append(f"{p.relative_to(SRC)}: {needle}")
    assert offenders == []
