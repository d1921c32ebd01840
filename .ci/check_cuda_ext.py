r"""Builds the whole extension with CUDA (no GPU needed) and checks its kernel registrations.

Run by .ci/check_cuda_build.sh with a CUDA build of torch, from the repository root, with the
repository on PYTHONPATH (the package is not installed):

    python .ci/check_cuda_ext.py BUILD_DIR

Builds with fastbnf._build.extension_kwargs(cuda=True), the flags setup.py uses, loads the
library, and asserts that every kernel op of fastbnf.ops.library has a CUDA kernel (and a CPU
kernel when CPU sources exist).
"""

import os
import sys
import time

os.environ.setdefault("FASTBNF_BUILD_EXT", "0")

import torch
from torch.utils.cpp_extension import load


def main(build_dir: str) -> int:
    assert torch.version.cuda, f"torch {torch.__version__} is not a CUDA build"

    start = time.perf_counter()
    # The package imports from the tree, without the extension; its op library declares the
    # kernel ops the extension registers kernels to.
    from fastbnf import _build
    from fastbnf.ops.library import KERNEL_SUFFIX, SCHEMAS

    print(f"import fastbnf from the tree: {time.perf_counter() - start:.1f} s", flush=True)

    kwargs = _build.extension_kwargs(cuda=True)
    print("sources:", *kwargs["sources"], sep="\n  ", flush=True)
    os.makedirs(build_dir, exist_ok=True)
    start = time.perf_counter()
    load(
        name="fastbnf_C",
        sources=kwargs["sources"],
        extra_include_paths=kwargs["include_dirs"],
        extra_cflags=kwargs["extra_compile_args"]["cxx"],
        extra_cuda_cflags=kwargs["extra_compile_args"]["nvcc"],
        extra_ldflags=[f"-L{d}" for d in kwargs["library_dirs"]],
        build_directory=build_dir,
        with_cuda=True,
        is_python_module=False,
        verbose=os.environ.get("VERBOSE", "0") == "1",
    )
    print(f"build + load of the extension: {time.perf_counter() - start:.1f} s", flush=True)

    has_cpu_sources = any("/cpu/" in s.replace(os.sep, "/") for s in kwargs["sources"])
    missing = []
    for name in SCHEMAS:
        op = f"fastbnf::{name}{KERNEL_SUFFIX}"
        keys = ["CUDA"] + (["CPU"] if has_cpu_sources else [])
        for key in keys:
            ok = torch._C._dispatch_has_kernel_for_dispatch_key(op, key)
            print(f"  {op:36s} {key:4s} {'ok' if ok else 'MISSING'}")
            if not ok:
                missing.append(f"{op} ({key})")
    if missing:
        print("kernels missing:", ", ".join(missing), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "build/ci-cuda"))
