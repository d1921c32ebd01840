r"""The ops' C++ autograd path: the autograd nodes of ``csrc/eager_nodes.h``.

One call per group and direction, and no Python in the backward: a small model's step is bound
by host time, which Python autograd functions add to (``docs/design.md``). The nodes take one
sample at a time, in eager mode, on a device with compiled kernels and outside functorch
transforms; :mod:`fastbnf.ops.functions` takes every other call, and both compute the same
(``tests/test_autograd_paths.py``).
"""

import torch

from collections.abc import Sequence
from torch import Tensor

from .. import _compat
from .._backend import backend, native_module
from .prior import STANDARD_NORMAL, Prior


def usable(tensors: Sequence[Tensor]):
    r"""The extension module when the C++ nodes can run a group of these tensors (a compiled
    backend for their device, no functorch transform), else :py:`None`."""

    if len(tensors) == 0 or _compat.functorch_active():
        return None
    # A compiled backend means a loaded extension.
    return None if backend(tensors[0].device) == "torch" else native_module()


_STANDARD_ARGS = (1.0, None, None)


def _prior_args(prior: Prior) -> tuple:
    if prior is STANDARD_NORMAL:
        return _STANDARD_ARGS
    var, variances, means = prior
    return (
        float(var),
        None if variances is None else [float(v) for v in variances],
        None if means is None else list(means),
    )


def kl(module, means: Sequence[Tensor], logvars: Sequence[Tensor], prior: Prior, linked: bool):
    r"""``[kl]``, or ``[kl, token]`` when ``linked`` (see :class:`fastbnf.ops.Link`)."""

    return module.eager_kl(list(means), list(logvars), *_prior_args(prior), linked)


def sample(
    module,
    means: Sequence[Tensor],
    logvars: Sequence[Tensor],
    out_dtype: torch.dtype | None,
    with_kl: bool,
    prior: Prior,
    salt: int,
    split: bool,
    token: Tensor | None,
) -> list[Tensor]:
    r"""``[theta, kl, rng_state]``, or ``[pieces..., kl, rng_state]`` when ``split``."""

    return module.eager_sample(
        list(means), list(logvars), out_dtype, with_kl, *_prior_args(prior), salt, split, token
    )
