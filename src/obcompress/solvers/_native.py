"""The fused elimination-step kernel (``_kernel.c``), loaded with ctypes; see ``_kernel_build``.

Where it comes from, in order: ``OBCOMPRESS_NATIVE=0`` switches it off; the library built at
install time (``pip install``, ``make install``), when it was built for this CPU; else it is built
at first use with the system C compiler into the user cache directory (keyed by the source, the
compiler and the CPU); else the solvers run their pure-torch step (the same arithmetic, slower;
README "How the exact solvers are fast on a CPU" has the figures). ``status()`` says which, and
every SolverResult of the exact solvers records the engine its loop ran on (``info["engine"]``).

Building at first use is the one place where the solvers write a file (the library, into the
cache); an installed library makes it unnecessary.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.machinery
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, Optional

from ..files import atomic_path, cache_dir
from . import _kernel_build as kb

_lib = None
_tried = False
_status: Dict[str, Any] = {}

_ARGTYPES = [
    ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,  # R, m, S, k
    ctypes.c_void_p, ctypes.c_int64,  # A, its row-chunk stride (0 while rows share H^-1)
    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,  # U, w, diag, pen
    ctypes.c_void_p, ctypes.c_void_p,  # alive, idx
    ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_double,  # mode, scale, zero, maxq
    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,  # gid, counts, G, ppg
    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,  # order, loss, value, stride
    ctypes.c_void_p,  # scratch
]


def installed_library() -> Optional[Path]:
    """The library ``setup.py`` built next to this file, if there is one."""
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / (kb.LIBRARY + suffix)
        if path.is_file():
            return path
    return None


def _installed():
    """The installed library, loaded, when it was built from this source for this CPU (else None)."""
    path = installed_library()
    if path is None:
        return None
    lib = ctypes.CDLL(str(path))  # no code of the library runs at load: its info is read first
    lib.obc_build_info.restype = ctypes.c_char_p
    if not kb.fits_this_machine(lib.obc_build_info().decode()):
        return None
    return path


def _build_at_first_use() -> Path:
    cc = kb.find_compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install one and reinstall obcompress)")
    key = hashlib.sha256(kb.SOURCE.read_bytes() + " ".join([cc, *kb.FLAGS]).encode() + kb.cpu_signature().encode())
    name = f"obs_step-{key.hexdigest()[:16]}.so"
    # A read-only home (some CI runners) falls back to the temporary directory.
    places = [cache_dir() / "kernels", Path(tempfile.gettempdir()) / "obcompress-kernels"]
    target = next((p / name for p in places if (p / name).exists()), None)
    if target is not None:
        return target
    for place in places:
        try:
            # atomic: a concurrent process sees all of the library or nothing
            with atomic_path(place / name) as tmp:
                kb.compile_library(cc, tmp)
            return place / name
        except OSError:
            continue
    raise OSError(f"no writable directory for the kernel among {[str(p) for p in places]}")


def _load(path: Path):
    lib = ctypes.CDLL(str(path))
    for name in ("obs_step_f32", "obs_step_f64"):
        fn = getattr(lib, name)
        fn.argtypes = _ARGTYPES
        fn.restype = None
    for name in ("block_step_f32", "block_step_f64"):
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_int64] * 5 + [ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_void_p] * 7 + [
            ctypes.c_int64, ctypes.c_void_p]
        fn.restype = None
    for name in ("gather_sub_f32", "gather_sub_f64"):
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                       ctypes.c_void_p]
        fn.restype = None
    for name in ("compact_f32", "compact_f64"):
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
        fn.restype = None
    return lib


def kernel():
    """The loaded kernel library, or None (switched off, or neither installed nor buildable here)."""
    global _lib, _tried
    if os.environ.get("OBCOMPRESS_NATIVE", "1") == "0":
        return None
    if _tried:
        return _lib
    _tried = True
    path = _installed()
    source = "installed"
    try:
        if path is None:
            source = "built at first use"
            path = _build_at_first_use()
        _lib = _load(path)
        _status.update(source=source, path=str(path))
    except (OSError, RuntimeError, AttributeError) as e:
        warnings.warn(f"obcompress: fused solver kernel unavailable, using the torch path ({e})", stacklevel=2)
        _lib = None
        _status.update(source=None, path=None, reason=str(e))
    return _lib


def status() -> Dict[str, Any]:
    """Which step engine the exact solvers use on CPU tensors: ``engine`` "native" (the fused C
    kernel; ``source`` "installed" or "built at first use", ``path``) or "torch" (``reason``)."""
    if os.environ.get("OBCOMPRESS_NATIVE", "1") == "0":
        return {"engine": "torch", "reason": "OBCOMPRESS_NATIVE=0"}
    lib = kernel()
    if lib is None:
        return {"engine": "torch", "reason": _status.get("reason", "unavailable")}
    return {"engine": "native", "source": _status["source"], "path": _status["path"]}
