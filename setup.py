r"""Builds fastbnf and its extension fastbnf._C.

Install into an existing environment with ``pip install --no-build-isolation .`` (build
isolation would fetch another torch). ``FASTBNF_BUILD_EXT=0`` skips the extension;
``FASTBNF_BUILD_CUDA=0`` skips its CUDA part.
"""

import importlib.util
import os

from pathlib import Path
from setuptools import setup


def _load_build():
    path = Path(__file__).resolve().parent / "fastbnf" / "_build.py"
    spec = importlib.util.spec_from_file_location("fastbnf_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _extensions() -> tuple[list, dict]:
    if os.environ.get("FASTBNF_BUILD_EXT", "1") == "0":
        return [], {}

    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    build = _load_build()
    cuda = build.with_cuda()
    kwargs = build.extension_kwargs(cuda)
    # setuptools wants sources relative to setup.py.
    kwargs["sources"] = [os.path.relpath(s, build.ROOT) for s in kwargs["sources"]]
    extension = (CUDAExtension if cuda else CppExtension)("fastbnf._C", **kwargs)

    return [extension], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()

setup(ext_modules=ext_modules, cmdclass=cmdclass)
