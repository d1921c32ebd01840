r"""The op boundary: the differentiable functions the model calls.

The ops ``torch.ops.fastbnf.*`` are declared in :mod:`fastbnf.ops.library`, a leaf, and
implemented in :mod:`fastbnf.ops.dispatch`: each call runs the compiled kernel op
``fastbnf::<name>_kernel`` or the pure-PyTorch twin in :mod:`fastbnf.reference`, as
:func:`fastbnf.backend` says for the device at call time. The ops have no autograd of their own.

The functions below differentiate them along one of two paths, which compute the same
(``tests/test_autograd_paths.py``): the C++ autograd nodes of :mod:`fastbnf.ops.native`, in
eager mode on a device with compiled kernels, and the :class:`torch.autograd.Function`\ s of
:mod:`fastbnf.ops.functions` everywhere else, :func:`torch.compile` included. Every call shows in
:mod:`torch.profiler` as ``fastbnf::<name>``. :mod:`fastbnf.ops.link` ties a KL to the next
sample of its group.
"""

__all__ = [
    "Link",
    "Prior",
    "kl",
    "sample",
    "unflatten",
    "variance",
]

import torch

from collections.abc import Sequence
from torch import Tensor

from .. import _flat
from . import dispatch, library, native  # noqa: F401 (the ops' declarations, implementations)
from .functions import KL, Sample, Variance, apply
from .link import Link
from .prior import STANDARD_NORMAL, Prior

#: Splits a flat tensor into views shaped like a list of tensors (:func:`fastbnf._flat.unflatten`).
unflatten = _flat.unflatten


def sample(
    means: Sequence[Tensor],
    logvars: Sequence[Tensor],
    n: int | None = None,
    out_dtype: torch.dtype | None = None,
    with_kl: bool = False,
    prior: Prior = STANDARD_NORMAL,
    salt: int = 0,
    split: bool = False,
    link: Link | None = None,
) -> tuple[Tensor | list[Tensor], Tensor, Tensor]:
    r"""Samples a group of parameters from their posterior, and optionally the KL.

    Arguments:
        means: The posterior means of the group's tensors, on one device. Their dtype is the
            first one's (float16, bfloat16, float32 or float64); others are converted, and
            non-contiguous tensors copied.
        logvars: Their posterior log-variances, alike.
        n: The number of samples, or :py:`None` for one sample without a leading dim.
        out_dtype: The dtype of the samples, by default the group's.
        with_kl: Whether to compute the KL divergence to the prior in the same pass.
        prior: The prior of the KL.
        salt: An integer folded into the noise's key (the data-parallel rank).
        split: Whether to return the samples as one view per tensor, shaped like it (with a
            leading dim of size ``n``), rather than flat.
        link: The :class:`Link` of a KL of the same tensors, drawn without ``with_kl``: their
            backward is then one kernel call (eager mode; ignored under :func:`torch.compile`).

    Returns:
        The samples, flat with shape :math:`(N)` or :math:`(n, N)` or split, the KL divergence
        (zero unless ``with_kl``), and the ``(seed, offset)`` state the noise was drawn from.
    """

    if link is not None and with_kl:
        raise ValueError("sample() takes a link only without with_kl")

    options = (n, out_dtype, with_kl, *prior, salt)
    if torch.compiler.is_compiling():
        # A link ties two eager nodes; kl() ignores it in a traced graph, and so does this.
        # Flat out of the function and split in the graph: a function's outputs that are views
        # of each other are not traced.
        theta, kl, rng_state = Sample.apply(options, False, None, None, *means, *logvars)
        return (unflatten(theta, means) if split else theta), kl, rng_state

    if link is not None:
        # Read by the sample, but not its inputs: the KL's node has their edges.
        linked_tensors = link.take(means, logvars)
        if not link.token.requires_grad:
            link = None  # the KL's node would not run in the backward

    # The C++ nodes draw one sample at a time, and take a link only from a KL of theirs.
    module = native.usable(means) if n is None else None
    if module is not None and (link is None or link.native):
        token = None if link is None else link.token
        *theta, kl, rng_state = native.sample(
            module, means, logvars, out_dtype, with_kl, prior, salt, split, token
        )
        return (theta if split else theta[0]), kl, rng_state
    if link is not None and link.native:
        link = None  # not followed here: the KL's node then computes the KL's gradients alone

    if link is None:
        *theta, kl, rng_state = apply(Sample, options, split, None, None, *means, *logvars)
    else:
        *theta, kl, rng_state = apply(Sample, options, split, link, linked_tensors, link.token)
    return (theta if split else theta[0]), kl, rng_state


def kl(
    means: Sequence[Tensor],
    logvars: Sequence[Tensor],
    prior: Prior = STANDARD_NORMAL,
    link: Link | None = None,
) -> Tensor:
    r"""Returns the KL divergence between a group's posterior and its prior.

    Arguments:
        means: The posterior means of the group's tensors.
        logvars: Their posterior log-variances.
        prior: The prior.
        link: A fresh :class:`Link`, to pass to the :func:`sample` of the same tensors that
            follows (eager mode, with gradients; ignored otherwise).

    Returns:
        The KL divergence, a 0-dim tensor.
    """

    if torch.compiler.is_compiling():
        return KL.apply(prior, None, *means, *logvars)
    linked = link is not None and torch.is_grad_enabled()
    module = native.usable(means)
    if module is not None:
        outputs = native.kl(module, means, logvars, prior, linked)
    elif linked:
        outputs = apply(KL, prior, link, *means, *logvars)
    else:
        return apply(KL, prior, None, *means, *logvars)
    if linked:
        link.token = outputs[1]
        link.tensors = (*means, *logvars)
        link.native = module is not None
    return outputs[0]


def variance(logvars: Sequence[Tensor]) -> Tensor:
    r"""Returns the flat posterior variances :math:`\exp(\mathrm{softclip}(\log \sigma^2))`.

    Arguments:
        logvars: The posterior log-variances of a group's tensors.
    """

    return apply(Variance, *logvars)
