"""Getting the zoo's third-party pieces at run time: optional packages and Debian data packages.

Nothing fetched here is ever committed: Debian packages are downloaded with ``apt-get download`` into a
temporary folder under the cache directory, the files needed are read straight out of the ``.deb``
(an ``ar`` archive holding ``data.tar.*``) and the ``.deb`` is deleted once the caller has cached what
it built from them. Machines without apt can put the ``.deb`` files in ``$OBCOMPRESS_DEB_DIR``.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Callable, Dict, Iterator

from ..files import cache_dir

INSTALL_HINT = "pip install 'obcompress[zoo]'"


class ZooUnavailable(RuntimeError):
    """A zoo model cannot be built here: an optional package is missing or its data cannot be fetched."""


class MissingPackage(ZooUnavailable, ImportError):
    pass


def require(module: str, pip_name: str, what: str):
    """Import ``module`` or fail with an error that says what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingPackage(
            f"{what} needs the optional package {pip_name!r} (import {module!r} failed: {e}); {INSTALL_HINT}"
        ) from e


def _find_local_deb(package: str):
    folder = os.environ.get("OBCOMPRESS_DEB_DIR")
    if not folder:
        return None
    hits = sorted(Path(folder).glob(f"{package}_*.deb"))
    return hits[-1] if hits else None


@contextlib.contextmanager
def debian_package(package: str) -> Iterator[Path]:
    """Path of ``package``'s ``.deb``: from ``$OBCOMPRESS_DEB_DIR`` if it is there, else downloaded with
    ``apt-get download`` into a temporary folder that is removed on exit."""
    local = _find_local_deb(package)
    if local is not None:
        yield local
        return
    apt = shutil.which("apt-get")
    if apt is None:
        raise ZooUnavailable(
            f"the Debian package {package!r} is needed and apt-get is not available here: download "
            f"{package}_*.deb on a Debian/Ubuntu machine (apt-get download {package}) and put it in a folder "
            "named by $OBCOMPRESS_DEB_DIR"
        )
    root = cache_dir() / "debian"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ZooUnavailable(f"cannot create the cache folder {root}: {e}") from e
    with tempfile.TemporaryDirectory(dir=root, prefix=f"{package}-") as tmp:
        try:
            proc = subprocess.run(
                [apt, "download", package], cwd=tmp, capture_output=True, text=True, timeout=900
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise ZooUnavailable(f"apt-get download {package} failed: {e}") from e
        debs = sorted(Path(tmp).glob(f"{package}_*.deb"))
        if proc.returncode != 0 or not debs:
            detail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise ZooUnavailable(
                f"apt-get download {package} failed (exit {proc.returncode}): {' | '.join(detail)}. If the package "
                "is unknown, run `apt-get update` once; offline, put the .deb in a folder named by $OBCOMPRESS_DEB_DIR"
            )
        yield debs[-1]


def _data_tar(deb: Path) -> tarfile.TarFile:
    with open(deb, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise ZooUnavailable(f"{deb} is not a Debian package (no ar header)")
        while True:
            header = f.read(60)
            if len(header) < 60:
                raise ZooUnavailable(f"{deb} holds no data.tar member (truncated download?)")
            name = header[:16].decode("ascii", "replace").strip().rstrip("/")
            size = int(header[48:58].decode("ascii").strip())
            if name.startswith("data.tar"):
                payload = f.read(size)
                if len(payload) != size:
                    raise ZooUnavailable(f"{deb} is truncated")
                if name.endswith(".zst"):
                    payload = _unzstd(deb, payload)
                return tarfile.open(fileobj=io.BytesIO(payload), mode="r:*")
            f.seek(size + (size & 1), os.SEEK_CUR)  # ar members are 2-byte aligned


def _unzstd(deb: Path, payload: bytes) -> bytes:
    """The tar inside a zstd-compressed data member (every Ubuntu package since 21.10): dpkg-deb
    reads it where Debian's tools are installed, else the ``zstandard`` package if present."""
    dpkg = shutil.which("dpkg-deb")
    if dpkg is not None:
        try:
            proc = subprocess.run([dpkg, "--fsys-tarfile", str(deb)], capture_output=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise ZooUnavailable(f"dpkg-deb --fsys-tarfile {deb} failed: {e}") from e
        if proc.returncode == 0:
            return proc.stdout
        raise ZooUnavailable(f"dpkg-deb --fsys-tarfile {deb} failed: {proc.stderr.decode(errors='replace').strip()}")
    try:
        import zstandard
    except ImportError:
        raise ZooUnavailable(f"{deb} compresses its data with zstd: install Debian's dpkg (dpkg-deb) or "
                             "`pip install zstandard` to read it") from None
    try:
        return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(payload)).read()
    except zstandard.ZstdError as e:
        raise ZooUnavailable(f"cannot decompress the data of {deb}: {e}") from e


def read_members(deb: Path, wanted: Callable[[str], bool]) -> Dict[str, bytes]:
    """``{path: bytes}`` of the regular files in ``deb`` whose path (no leading ``./``) satisfies ``wanted``.

    Files are read in memory rather than unpacked, so nothing outside the cache is written and no
    archive path can escape it.
    """
    out: Dict[str, bytes] = {}
    try:
        with _data_tar(deb) as tar:
            for member in tar:
                name = member.name[2:] if member.name.startswith("./") else member.name
                if member.isfile() and wanted(name):
                    out[name] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise ZooUnavailable(f"cannot read {deb}: {e}") from e
    return out


