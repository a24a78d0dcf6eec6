"""How the fused elimination-step kernel (``_kernel.c``) becomes a shared library.

One recipe for both builds: ``setup.py`` runs it at install time (the library then sits next to
this file as ``_kernel_lib<EXT_SUFFIX>``), and ``_native`` runs it at first use where no installed
library fits this machine. The kernel is plain C99 on raw pointers, loaded with ctypes: no Python
or torch headers. It is compiled for the CPU it will run on (``-march=native``, or portable flags
where the compiler refuses that), and the library records in itself (``obc_build_info()``) the
source it was built from and, for ``-march=native``, the CPU, so that a stale copy or one copied
to another CPU is rebuilt rather than run.

Standard library only: ``setup.py`` loads this file by its path, without importing obcompress.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sysconfig
from pathlib import Path
from typing import List, Optional

SOURCE = Path(__file__).with_name("_kernel.c")
LIBRARY = "_kernel_lib"
FLAGS = ["-O3", "-shared", "-fPIC", "-std=c99"]
ARCH_FLAGS = (["-march=native"], [])  # tried in order
SYMBOLS = ("obs_step_f32", "obs_step_f64", "block_step_f32", "block_step_f64", "gather_sub_f32", "gather_sub_f64",
           "compact_f32", "compact_f64", "obc_build_info")


def find_compiler() -> Optional[str]:
    """The C compiler: $CC, Python's own, or cc / gcc / clang on the PATH (None: there is none)."""
    for cand in (os.environ.get("CC"), (sysconfig.get_config_var("CC") or "").split(" ")[0], "cc", "gcc", "clang"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


def cpu_signature() -> str:
    """A digest of this CPU (architecture, model and feature flags): -march=native code must not
    run on another CPU (a shared cache, a copied installation)."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features", "model name")):
                    flags += line
    except OSError:
        pass
    return hashlib.sha256((platform.machine() + platform.processor() + flags).encode()).hexdigest()[:16]


def _source_digest() -> str:
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]


def build_info(flags: List[str]) -> str:
    """What a library records about itself (its ``obc_build_info()``): the source it was built
    from and, for a -march=native build, the CPU."""
    return f"source={_source_digest()};cpu={cpu_signature() if '-march=native' in flags else 'any'}"


def fits_this_machine(info: str) -> bool:
    """Whether a library with this build info was built from this source for a CPU like this one."""
    fields = dict(part.split("=", 1) for part in info.split(";") if "=" in part)
    return fields.get("source") == _source_digest() and fields.get("cpu") in ("any", cpu_signature())


def compile_library(cc: str, target: Path) -> List[str]:
    """Compile ``SOURCE`` with ``cc`` into the shared library ``target``; returns the flags that
    worked, RuntimeError (with the compiler's messages) if none did."""
    errors = []
    for arch in ARCH_FLAGS:
        flags = [*FLAGS, *arch]
        info = f'-DOBC_BUILD_INFO="{build_info(flags)}"'
        proc = subprocess.run([cc, *flags, info, str(SOURCE), "-o", str(target), "-lm"], capture_output=True, text=True)
        if proc.returncode == 0:
            return flags
        errors.append(proc.stderr.strip()[-500:])
    raise RuntimeError(" / ".join(errors))
