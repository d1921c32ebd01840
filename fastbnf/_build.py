r"""Sources and flags of the extension ``fastbnf._C``, shared by ``setup.py`` and the JIT path.

This file is loaded by path from ``setup.py``, before the package is importable: it imports
nothing of fastbnf at module level.
"""

__all__ = ["extension_kwargs", "jit_load", "with_cuda"]

import importlib.util
import os

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"

# -ffast-math lets GCC vectorize logf/sinf/cosf through libmvec. It goes in the compile flags
# only: a shared object *linked* with it sets flush-to-zero for the whole process on load.
CXX_FLAGS = ["-O3", "-ffast-math", "-fno-finite-math-only", "-fopenmp-simd"]


def _cuda_module():
    spec = importlib.util.spec_from_file_location("_build_cuda", Path(__file__).with_name("_build_cuda.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def with_cuda() -> bool:
    r"""Tells whether to build the CUDA kernels: torch has CUDA, nvcc exists, and
    ``FASTBNF_BUILD_CUDA`` is not ``0``."""

    if os.environ.get("FASTBNF_BUILD_CUDA", "1") == "0":
        return False
    return _cuda_module().cuda_build_available()


def cpu_sources() -> list[str]:
    r"""Returns the C++ sources of the CPU kernels and their registration."""

    return [str(p) for p in sorted((CSRC / "cpu").glob("*.cpp"))]


def extension_kwargs(cuda: bool | None = None) -> dict:
    r"""Returns the sources and flags of the extension, for CppExtension or CUDAExtension."""

    cuda = with_cuda() if cuda is None else cuda
    sources = [str(CSRC / "module.cpp"), *cpu_sources()]
    include_dirs = [str(CSRC)]
    library_dirs = []
    compile_args = {"cxx": list(CXX_FLAGS)}

    if cuda:
        build_cuda = _cuda_module()
        sources += build_cuda.cuda_sources()
        include_dirs += build_cuda.cuda_include_dirs()
        library_dirs += build_cuda.cuda_library_dirs()
        compile_args["nvcc"] = build_cuda.nvcc_flags()

    return {
        "sources": sources,
        "include_dirs": include_dirs,
        "library_dirs": library_dirs,
        "extra_compile_args": compile_args,
    }


def jit_load() -> None:
    r"""Builds and loads the extension with :func:`torch.utils.cpp_extension.load`."""

    from torch.utils.cpp_extension import load

    cuda = with_cuda()
    kwargs = extension_kwargs(cuda)

    load(
        name="fastbnf_C",
        sources=kwargs["sources"],
        extra_include_paths=kwargs["include_dirs"],
        extra_cflags=kwargs["extra_compile_args"]["cxx"],
        extra_cuda_cflags=kwargs["extra_compile_args"].get("nvcc"),
        extra_ldflags=[f"-L{d}" for d in kwargs["library_dirs"]],
        with_cuda=cuda,
        is_python_module=False,
    )
