r"""Loading of the compiled extension and choice of the backend.

The extension ``fastbnf._C`` is loaded lazily, on the first op call. A missing or broken
extension gives one warning and the pure-PyTorch backend, never an import error.
"""

__all__ = ["backend", "extension_loaded", "has_kernel", "load_extension", "native_module"]

import functools
import importlib
import os
import torch
import warnings

from . import _compat

BACKENDS = ("torch", "cpp", "cuda")
_COMPILED = {"cpu": "cpp", "cuda": "cuda"}

# The loaded extension module (fastbnf._C, or the JIT build's), set by load_extension.
_module = None


@functools.cache
def load_extension() -> bool:
    r"""Loads ``fastbnf._C`` once and tells whether it loaded.

    Setting ``FASTBNF_JIT=1`` builds it with :func:`torch.utils.cpp_extension.load` when it is
    not installed.
    """

    # The kernel ops must be declared before the extension registers implementations of them.
    # Imported here, not at the top: the op library is a leaf that every layer may import, and
    # this module is imported by the ops.
    from .ops import library  # noqa: F401

    global _module

    try:
        _module = importlib.import_module("fastbnf._C")
        return True
    except Exception as error:
        reason = error

    if os.environ.get("FASTBNF_JIT") == "1":
        try:
            from ._build import jit_load

            _module = jit_load()
            return True
        except Exception as error:
            reason = error

    warnings.warn(
        f"fastbnf: the compiled kernels are not available ({reason}); "
        "falling back to the pure-PyTorch backend.",
        RuntimeWarning,
        stacklevel=3,
    )
    return False


def extension_loaded() -> bool:
    r"""Tells whether ``fastbnf._C`` is loaded, without loading it."""

    return load_extension.cache_info().currsize > 0 and load_extension()


def native_module():
    r"""The loaded extension module, whose functions are the eager path's C++ autograd nodes
    (``csrc/eager_nodes.h``), or :py:`None` when it is not loaded."""

    return _module


@functools.cache
def has_kernel(device_type: str) -> bool:
    r"""Tells whether every compiled kernel op is registered for a device type.

    Arguments:
        device_type: A device type, such as ``"cpu"`` or ``"cuda"``.
    """

    if device_type not in _COMPILED or not load_extension():
        return False

    from .ops.library import KERNEL_SUFFIX, SCHEMAS

    key = "CPU" if device_type == "cpu" else "CUDA"

    return all(
        _compat.dispatch_has_kernel(f"fastbnf::{name}{KERNEL_SUFFIX}", key) for name in SCHEMAS
    )


def backend(device: torch.device | str = "cpu") -> str:
    r"""Returns the backend that runs the ops on a device.

    The backend is ``"cuda"`` or ``"cpp"`` where the compiled kernels exist for the device and
    ``"torch"`` (pure PyTorch) elsewhere. The environment variable ``FASTBNF_BACKEND`` forces one;
    forcing a backend that cannot run on the device is an error.

    Arguments:
        device: A device.

    Returns:
        The name of the backend, ``"torch"``, ``"cpp"`` or ``"cuda"``.
    """

    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    return _backend_of(device_type, os.environ.get("FASTBNF_BACKEND", ""))


@functools.cache
def _backend_of(device_type: str, forced: str) -> str:
    r"""The backend of a device type under ``FASTBNF_BACKEND=forced``; cached, since every op
    call asks (an error is raised, not cached, on every call)."""

    if forced == "":
        return _COMPILED[device_type] if has_kernel(device_type) else "torch"
    elif forced == "torch":
        return "torch"
    elif forced not in BACKENDS:
        raise ValueError(
            f"FASTBNF_BACKEND={forced!r} is not a backend; expected one of {BACKENDS}."
        )
    elif _COMPILED.get(device_type) != forced:
        raise RuntimeError(
            f"FASTBNF_BACKEND={forced!r} cannot run tensors on device type {device_type!r}."
        )
    elif not has_kernel(device_type):
        raise RuntimeError(
            f"FASTBNF_BACKEND={forced!r} is forced but the {forced} kernels are not built; "
            "install fastbnf with its extension (docs/usage.md) or unset FASTBNF_BACKEND."
        )

    return forced
