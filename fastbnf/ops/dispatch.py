r"""The implementation of each op call: the compiled kernel op or the pure-PyTorch twin.

It also registers the public ops' implementation (:mod:`fastbnf.ops.library` declares them),
which makes the same choice at call time.
"""

__all__ = ["device_of", "run", "traces_kernels"]

import torch

from collections.abc import Sequence
from torch import Tensor

from .. import reference
from .._backend import backend
from .library import KERNEL_SUFFIX


def device_of(tensors: Sequence[Tensor]) -> torch.device | None:
    r"""The device of a group's tensors, :py:`None` for an empty group."""

    return tensors[0].device if len(tensors) > 0 else None


@torch.compiler.assume_constant_result
def traces_kernels(device_type: str) -> bool:
    r"""Whether a compiled step calls the kernel ops on a device type (its backend is compiled)
    rather than the public ops (the pure-PyTorch twin). Decided when the step is traced, as a
    constant: a later ``FASTBNF_BACKEND`` does not change a compiled graph."""

    return backend(device_type) != "torch"


def run(name: str, device: torch.device | None, *args):
    r"""Runs an op on the backend that :func:`fastbnf.backend` names for the device.

    In eager mode the kernel op or the twin is called directly, past the public op's Python
    dispatch. Under :func:`torch.compile` the graph gets an opaque op: the kernel op where the
    device has compiled kernels, else the public op (whose implementation, below, runs the
    twin when the graph runs). Without a device (an empty group) the twin runs: it raises the
    contract's error, where a kernel op given no tensor could not even be dispatched.
    """

    if torch.compiler.is_compiling():
        if device is not None and traces_kernels(device.type):
            return getattr(torch.ops.fastbnf, name + KERNEL_SUFFIX)(*args)
        return getattr(torch.ops.fastbnf, name)(*args)
    if device is None or backend(device) == "torch":
        return getattr(reference, name)(*args)
    return getattr(torch.ops.fastbnf, name + KERNEL_SUFFIX)(*args)


def _public(name: str, device_of_args):
    def implementation(*args):
        return run(name, device_of_args(args), *args)

    implementation.__name__ = name
    return implementation


# The device of each public op's call: of its first tensor argument (a gradient, or a group).
_DEVICE_OF_ARGS = {
    "sample": lambda args: device_of(args[0]),
    "sample_backward": lambda args: args[0].device,
    "kl": lambda args: device_of(args[0]),
    "kl_backward": lambda args: device_of(args[1]),
    "variance": lambda args: device_of(args[0]),
}

for _name, _device_of_args in _DEVICE_OF_ARGS.items():
    torch.library.register_kernel(f"fastbnf::{_name}", None, _public(_name, _device_of_args))
