"""Builds the solvers' fused step kernel at install time; everything else is in pyproject.toml.

The kernel (src/obcompress/solvers/_kernel.c) is plain C99 on raw pointers, loaded with ctypes: a
setuptools Extension compiles it in about a second with the system C compiler and the same recipe
as the run-time fallback (solvers/_kernel_build.py). It is optional: where no compiler exists
(Windows without one, slim containers) the install goes on with a warning and the solvers build it
at first use where they can, or run their torch step. torch's cpp_extension would need torch inside
the isolated build environment (pip would fetch a multi-GB CUDA build) and minutes of compiling
against libtorch's headers, for a kernel that uses none of them.
"""

import importlib.util
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_kernel_build", HERE / "src/obcompress/solvers/_kernel_build.py")
kb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kb)


class BuildKernel(build_ext):
    """Builds the kernel as a plain shared library (no Python module init) with ``kb``'s flags."""

    def build_extension(self, ext):
        from setuptools.errors import CompileError

        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        cc = kb.find_compiler()
        if cc is None:
            raise CompileError("no C compiler found; the solvers will build their kernel at first use if they can")
        try:
            kb.compile_library(cc, target)
        except (OSError, RuntimeError) as e:
            raise CompileError(str(e)) from None


setup(
    ext_modules=[Extension(f"obcompress.solvers.{kb.LIBRARY}", sources=[str(kb.SOURCE.relative_to(HERE))],
                           optional=True)],
    cmdclass={"build_ext": BuildKernel},
)
