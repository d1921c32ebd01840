r"""The pool of large CPU kernel outputs.

A training step allocates the same large outputs every step: samples and gradients. Fresh
ones cost a page fault per page and the zeroing of it by the kernel of the operating system,
about as much as the fused kernels' own work. The compiled CPU kernels therefore return their
buffers of 128 KiB or more to a pool when the tensors die, and serve the next output of the same
size from it. The pool keeps at most four times the largest output asked for, the oldest
buffers going first; ``FASTBNF_CPU_CACHE=0`` turns the keeping off. Such outputs cannot be
resized.
"""

__all__ = ["cached_bytes", "empty_cache"]

import torch

from ._backend import has_kernel


def empty_cache() -> int:
    r"""Frees the idle buffers of the CPU kernels' pool, as :func:`torch.cuda.empty_cache` does
    for CUDA's caching allocator.

    Returns:
        The number of bytes freed (0 without the compiled CPU kernels).
    """

    return torch.ops.fastbnf.cpu_cache_release() if has_kernel("cpu") else 0


def cached_bytes() -> int:
    r"""Returns the number of bytes held by the idle buffers of the CPU kernels' pool."""

    return torch.ops.fastbnf.cpu_cache_bytes() if has_kernel("cpu") else 0
