r"""The backend of each op call: the compiled kernel op or the pure-PyTorch twin."""

import torch

from collections.abc import Sequence
from torch import Tensor

from .. import reference
from .._backend import backend
from .._schemas import KERNEL_SUFFIX


def _device(tensors: Sequence[Tensor]) -> torch.device | None:
    return tensors[0].device if len(tensors) > 0 else None


def _run(name: str, device: torch.device | None, *args):
    r"""Runs an op on the backend that :func:`fastbnf.backend` names for the device.

    Without a device (an empty group) the twin runs: it raises the contract's error, where a
    kernel op given no tensor could not even be dispatched."""

    if device is None or backend(device) == "torch":
        return getattr(reference, name)(*args)
    return getattr(torch.ops.fastbnf, name + KERNEL_SUFFIX)(*args)
