r"""Builds fastbnf and its extension fastbnf._C.

Install into an existing environment with ``pip install --no-build-isolation .`` (build
isolation would fetch another torch), after ``pip install -U setuptools wheel ninja pybind11``.
``FASTBNF_BUILD_EXT=0`` skips the extension; ``FASTBNF_BUILD_CUDA=0`` skips its CUDA part. A
build of the extension that fails leaves the package without it, with one warning: fastbnf then
runs its pure-PyTorch backend.

The sources ``csrc/`` are installed with the package (``fastbnf/_csrc``), so that
``FASTBNF_JIT=1`` can build the extension from an installed package.
"""

import importlib.util
import os
import shutil
import sys

from pathlib import Path
from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _load_build():
    path = ROOT / "fastbnf" / "_build.py"
    spec = importlib.util.spec_from_file_location("fastbnf_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithSources(build_py):
    r"""Copies ``csrc/`` into the built package as ``fastbnf/_csrc``, for the JIT build."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "fastbnf" / "_csrc"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(ROOT / "csrc", target)


def _extensions() -> tuple[list, dict]:
    if os.environ.get("FASTBNF_BUILD_EXT", "1") == "0":
        return [], {}

    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    class BuildOrFallBack(BuildExtension):
        r"""Builds the extension; if that fails, warns once and installs the package without
        it (the pure-PyTorch backend), rather than failing the install."""

        def run(self):
            try:
                super().run()
            except Exception as error:  # a compiler error, a missing toolchain, ...
                message = (
                    f"fastbnf: building the compiled kernels failed ({type(error).__name__}: "
                    f"{error}); installing fastbnf without them: it runs its pure-PyTorch "
                    "backend. Set FASTBNF_BUILD_EXT=0 to skip the build."
                )
                print(f"WARNING: {message}", file=sys.stderr)
                self.warn(message)
                self.extensions = []

    build = _load_build()
    cuda = build.with_cuda()
    kwargs = build.extension_kwargs(cuda)
    # setuptools wants sources relative to setup.py.
    kwargs["sources"] = [os.path.relpath(s, ROOT) for s in kwargs["sources"]]
    extension = (CUDAExtension if cuda else CppExtension)("fastbnf._C", **kwargs)

    return [extension], {"build_ext": BuildOrFallBack}


ext_modules, cmdclass = _extensions()

setup(ext_modules=ext_modules, cmdclass={**cmdclass, "build_py": BuildPyWithSources})
