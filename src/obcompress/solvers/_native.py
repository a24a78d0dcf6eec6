"""The fused elimination-step kernel (``_kernel.c``), compiled on first use with the system C compiler.

The kernel is built for this machine (``-O3 -march=native``) into the user cache directory, keyed
by the source, the compiler and the CPU, and loaded with ctypes: no build step at install time and
no Python C-API. Where no compiler is available, or with ``OBCOMPRESS_NATIVE=0``, ``kernel()``
returns None and the solvers run their pure-torch step instead (the same arithmetic).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sysconfig
import tempfile
import warnings
from pathlib import Path
from typing import Optional

from ..files import atomic_path, cache_dir

_SOURCE = Path(__file__).with_name("_kernel.c")
_FLAGS = ["-O3", "-shared", "-fPIC", "-std=c99"]
_lib = None
_tried = False

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


def _compiler() -> Optional[str]:
    for cand in (os.environ.get("CC"), (sysconfig.get_config_var("CC") or "").split(" ")[0], "cc", "gcc", "clang"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


def _cpu_signature() -> str:
    # -march=native code must not be reused on another CPU sharing the cache (e.g. a network home).
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features", "model name")):
                    flags += line
    except OSError:
        pass
    return platform.machine() + platform.processor() + flags


def _build(cc: str, target: Path) -> None:
    # atomic: a concurrent process sees all of the library or nothing
    with atomic_path(target) as tmp:
        errors = []
        for arch in (["-march=native"], []):
            cmd = [cc, *_FLAGS, *arch, str(_SOURCE), "-o", str(tmp), "-lm"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode == 0:
                return
            errors.append(proc.stderr.strip()[-500:])
        raise RuntimeError(" / ".join(errors))


def kernel():
    """The loaded kernel library, or None (no compiler, build failed, or OBCOMPRESS_NATIVE=0)."""
    global _lib, _tried
    if os.environ.get("OBCOMPRESS_NATIVE", "1") == "0":
        return None
    if _tried:
        return _lib
    _tried = True
    cc = _compiler()
    if cc is None:
        return None
    key = hashlib.sha256(_SOURCE.read_bytes() + " ".join([cc, *_FLAGS]).encode() + _cpu_signature().encode())
    name = f"obs_step-{key.hexdigest()[:16]}.so"
    # A read-only home (some CI runners) falls back to the temporary directory.
    places = [cache_dir() / "kernels", Path(tempfile.gettempdir()) / "obcompress-kernels"]
    try:
        target = next((p / name for p in places if (p / name).exists()), None)
        if target is None:
            for place in places:
                try:
                    target = place / name
                    _build(cc, target)
                    break
                except OSError:
                    target = None
            if target is None:
                raise OSError(f"no writable directory for the kernel among {[str(p) for p in places]}")
        lib = ctypes.CDLL(str(target))
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
        _lib = lib
    except (OSError, RuntimeError) as e:
        warnings.warn(f"obcompress: fused solver kernel unavailable, using the torch path ({e})", stacklevel=2)
        _lib = None
    return _lib
