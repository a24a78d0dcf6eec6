"""The files obcompress writes: where its cache lives, and the one way it writes a file or an
artifact directory.

Every writer goes through ``atomic_path`` (or ``atomic_directory`` for a whole directory): the
content is written under a temporary name next to the target, flushed to disk and renamed over
the target, so a reader sees the old file or the new one, never a part of it, and an interrupted
or failed write leaves no temporary behind. Files are created as ``open()`` creates them (mode
0o666 less the process umask), not owner-only as ``tempfile.mkstemp`` would make them.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Iterator, Union

from ._locks import directory_lock

__all__ = ["atomic_directory", "atomic_path", "cache_dir", "write_bytes", "write_json", "write_text"]

PathLike = Union[str, os.PathLike]


def cache_dir() -> Path:
    """``$OBCOMPRESS_CACHE``, else ``$XDG_CACHE_HOME/obcompress``, else ``~/.cache/obcompress``: what
    obcompress builds or downloads once (trained zoo weights, data, compiled kernels)."""
    env = os.environ.get("OBCOMPRESS_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg) / "obcompress" if xdg else Path.home() / ".cache" / "obcompress"


def _sibling(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.{kind}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # a file system without fsync (some network mounts): the rename still is atomic
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """A new empty file next to ``path`` (its directory is created) for the block to write to, by
    any means (a file object, a library's ``save(path)``, a compiler's ``-o``). When the block ends
    normally the file is flushed to disk and renamed over ``path``; on any exception it is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = _sibling(path, "tmp")
        try:
            # O_EXCL: a name nobody else holds; 0o666 less the umask: a normal file's permissions.
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically; returns the path."""
    return write_bytes(path, text.encode(encoding))


def write_json(path: PathLike, obj: Any, **dump_kwargs) -> Path:
    """Write ``obj`` as JSON (``json.dumps(obj, **dump_kwargs)``) to ``path`` atomically."""
    return write_text(path, json.dumps(obj, **dump_kwargs))


@contextlib.contextmanager
def atomic_directory(path: PathLike) -> Iterator[Path]:
    """A new empty directory next to ``path`` for the block to fill; when the block ends normally
    its files are flushed to disk and it replaces ``path`` (an existing directory there is moved
    aside first and removed after, so at every moment ``path`` is the old complete directory,
    absent, or the new one; concurrent writers swap one at a time, under a lock on the parent);
    on any exception it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = _sibling(path, "tmp")
        try:
            os.mkdir(tmp, 0o777)  # less the umask, as a directory made by mkdir(1)
            break
        except FileExistsError:
            continue
    try:
        yield tmp
        for p in tmp.iterdir():
            if p.is_file():
                _fsync(p)
        # Concurrent writers of one directory take turns for the swap (their writing into their
        # own temporaries runs in parallel): each swap sees a complete directory or none, and the
        # last one wins.
        with directory_lock(path.parent, wait=True, what=f"the parent of {path}"):
            # rename(2) cannot replace a non-empty directory: an old one goes aside first.
            old = _sibling(path, "old") if path.exists() else None
            if old is not None:
                os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                if old is not None:
                    os.replace(old, path)
                raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
