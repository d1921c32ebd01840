r"""The CUDA part of the build: sources, include and library folders, and nvcc flags.

Called by :mod:`fastbnf._build` (shared by ``setup.py`` and the JIT path). Only the standard
library is imported at module level; :mod:`torch` is imported inside the functions that need it.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from pathlib import Path

__all__ = [
    "cuda_arch_list",
    "cuda_toolkit_root",
    "cuda_build_available",
    "cuda_include_dirs",
    "cuda_library_dirs",
    "cuda_sources",
    "nvcc_flags",
]

ROOT = Path(__file__).resolve().parent.parent
# The checkout's sources; fastbnf._build sets the installed package's where they are.
CSRC = ROOT / "csrc"

#: Used when ``TORCH_CUDA_ARCH_LIST`` is unset and no GPU is visible: A100 and H100, with PTX
#: of the newest for the GPUs after them.
DEFAULT_ARCHS = ("8.0", "9.0+PTX")


def _nvcc() -> str | None:
    try:
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception:
        CUDA_HOME = None
    if CUDA_HOME:
        path = Path(CUDA_HOME) / "bin" / "nvcc"
        if path.exists():
            return str(path)
    return shutil.which("nvcc")


@functools.cache
def cuda_toolkit_root() -> Path | None:
    r"""The CUDA toolkit that nvcc belongs to (``TOP`` in ``nvcc --dryrun``).

    It differs from torch's ``CUDA_HOME`` when ``nvcc`` on the path is a wrapper script (e.g.
    ``/usr/local/bin/nvcc`` calling ``/usr/local/cuda-13.0/bin/nvcc``): torch then looks for the
    runtime headers in ``/usr/local/include``.
    """

    nvcc = _nvcc()
    if nvcc is None:
        return None
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "-x", "cu", "-E", os.devnull, "-o", os.devnull],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    if match is None:
        return None
    return Path(match.group(1).strip()).resolve()


def _toolkit_dirs(sub: str, probe: str) -> list[str]:
    root = cuda_toolkit_root()
    if root is None:
        return []
    dirs = [root / sub]
    if sub == "include":
        dirs.append(root / "targets" / "x86_64-linux" / "include")
    return [str(d) for d in dirs if (d / probe).exists()][:1]


def cuda_build_available() -> bool:
    r"""Whether the CUDA kernels can be built here: a CUDA build of torch and nvcc.

    ``FASTBNF_BUILD_CUDA=0`` turns them off, ``FASTBNF_BUILD_CUDA=1`` makes their absence an
    error in the caller (this function still answers truthfully).

    Returns:
        ``True`` when ``torch.version.cuda`` is set and ``nvcc`` is found.
    """

    if os.environ.get("FASTBNF_BUILD_CUDA", "") == "0":
        return False
    try:
        import torch
    except ImportError:
        return False
    return bool(getattr(torch.version, "cuda", None)) and _nvcc() is not None


def cuda_sources() -> list[str]:
    r"""Returns the CUDA sources, as absolute paths: the torch-free kernels ``csrc/cuda/*.cu``,
    then the torch side ``csrc/cuda/*.cpp`` (launchers, table cache, registration)."""

    cuda = CSRC / "cuda"
    return [str(f) for f in sorted(cuda.glob("*.cu")) + sorted(cuda.glob("*.cpp"))]


def _pip_cuda_roots() -> list[Path]:
    # CUDA 13 wheels put every library under nvidia/cu13 (a namespace package); CUDA 12 wheels
    # use one folder per library (nvidia/cusparse, ...). torch's CUDA headers include
    # cusparse.h and friends, which a bare nvcc install may lack.
    roots: list[Path] = []
    try:
        import nvidia
    except ImportError:
        return roots
    wanted = ("cu13", "cu12", "cuda_runtime", "cublas", "cusparse", "cusolver", "cufft", "curand")
    for base in map(Path, getattr(nvidia, "__path__", [])):
        for name in wanted:
            sub = base / name
            if sub.is_dir() and ((sub / "include").is_dir() or (sub / "lib").is_dir()):
                roots.append(sub)
    return roots


def cuda_include_dirs() -> list[str]:
    r"""Include folders for the CUDA sources: ``csrc`` and the pip CUDA headers when present."""

    # The toolkit's own headers come first: the pip ones (cuda_runtime_api.h without crt/)
    # only fill in the libraries' headers the toolkit lacks.
    dirs = [str(CSRC), *_toolkit_dirs("include", "cuda_runtime_api.h")]
    dirs += [str(r / "include") for r in _pip_cuda_roots() if (r / "include").is_dir()]
    return dirs


def cuda_library_dirs() -> list[str]:
    r"""Library folders of the pip CUDA wheels when present (``nvidia/cu13/lib``, ...)."""

    dirs = _toolkit_dirs("lib64", "libcudart.so")
    return dirs + [str(r / "lib") for r in _pip_cuda_roots() if (r / "lib").is_dir()]


def cuda_arch_list() -> list[str]:
    r"""The architectures to build for, like ``["8.0", "9.0+PTX"]``.

    ``TORCH_CUDA_ARCH_LIST`` (``;``, ``,`` or space separated, ``+PTX`` suffixes, ``9.0a``)
    when set; else the visible GPUs' capabilities; else :data:`DEFAULT_ARCHS`.
    """

    env = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if env and env != "native":
        return [a for a in re.split(r"[;,\s]+", env) if a]
    archs: list[str] = []
    try:
        import torch

        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                major, minor = torch.cuda.get_device_capability(i)
                arch = f"{major}.{minor}"
                if arch not in archs:
                    archs.append(arch)
    except Exception:
        archs = []
    return archs or list(DEFAULT_ARCHS)


def _gencode(arch: str) -> list[str]:
    match = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", arch)
    if match is None:
        raise ValueError(f"fastbnf: invalid CUDA architecture {arch!r} in TORCH_CUDA_ARCH_LIST")
    num = f"{match.group(1)}{match.group(2)}{match.group(3)}"
    flags = [f"-gencode=arch=compute_{num},code=sm_{num}"]
    if match.group(4):
        flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def nvcc_flags() -> list[str]:
    r"""nvcc flags: optimization and explicit ``-gencode`` flags for :func:`cuda_arch_list`.

    The explicit ``-gencode`` flags stop ``torch.utils.cpp_extension`` from adding its own
    (which, with no GPU and no ``TORCH_CUDA_ARCH_LIST``, would target every architecture).
    No ``--use_fast_math``: the normal transform must match the CPU kernels' to a few ulp.
    """

    flags = ["-O3", "-lineinfo"]
    for arch in cuda_arch_list():
        flags += _gencode(arch)
    return flags
