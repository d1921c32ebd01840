r"""Sources and flags of the extension ``fastbnf._C``, shared by ``setup.py`` and the JIT path.

This file is loaded by path from ``setup.py``, before the package is importable: it imports
nothing of fastbnf at module level.
"""

__all__ = ["extension_kwargs", "jit_load", "with_cuda"]

import importlib.util
import os
import sys

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The sources: installed with the package (setup.py copies them there), else the checkout's.
_INSTALLED = Path(__file__).resolve().parent / "_csrc"
CSRC = _INSTALLED if _INSTALLED.is_dir() else ROOT / "csrc"

# Why these flags:
# - OpenMP: with torch's OpenMP backend, at::parallel_for is inline header code that runs on one
#   thread unless the extension itself is compiled with -fopenmp (macOS torch uses its own
#   thread pool, and only the SIMD pragmas need enabling there). No link flag: the symbols
#   resolve to the libgomp that libtorch already loads.
# - No -ffast-math: the kernels' own log/sincos/exp polynomials vectorize with -fno-math-errno
#   alone, and a shared object linked with -ffast-math would set flush-to-zero process-wide.
# - -ffp-contract=off: softclip, theta and the KL round exactly as PyTorch's reference does
#   (near the softclip bound one ulp of softclip is 18 ulp of the variance).
# The C++ standard is torch's choice (torch 2.14 requires C++20).
_OPENMP = "-fopenmp-simd" if sys.platform == "darwin" else "-fopenmp"
CXX_FLAGS = ["-O3", _OPENMP, "-fno-math-errno", "-ffp-contract=off"]


def _cuda_module():
    spec = importlib.util.spec_from_file_location(
        "_build_cuda", Path(__file__).with_name("_build_cuda.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.CSRC = CSRC
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
    shared = ("module.cpp", "eager_helpers.cpp", "eager_nodes.cpp", "group.cpp")
    sources = [str(CSRC / name) for name in shared]
    sources += cpu_sources()
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


def jit_load():
    r"""Builds and loads the extension with :func:`torch.utils.cpp_extension.load`, and returns
    its module."""

    from torch.utils.cpp_extension import load

    cuda = with_cuda()
    kwargs = extension_kwargs(cuda)

    return load(
        name="fastbnf_C",
        sources=kwargs["sources"],
        extra_include_paths=kwargs["include_dirs"],
        extra_cflags=kwargs["extra_compile_args"]["cxx"],
        extra_cuda_cflags=kwargs["extra_compile_args"].get("nvcc"),
        extra_ldflags=[f"-L{d}" for d in kwargs["library_dirs"]],
        with_cuda=cuda,
        is_python_module=True,
    )
