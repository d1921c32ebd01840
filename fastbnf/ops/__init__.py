r"""The op boundary: the differentiable functions the model calls.

The public ops ``torch.ops.fastbnf.*`` are declared from :mod:`fastbnf._schemas` and implemented
here: each call runs the compiled kernel op ``fastbnf::<name>_kernel`` or the pure-PyTorch twin
in :mod:`fastbnf.reference`, as :func:`fastbnf.backend` says for the device at call time.

Three paths lead to them. Under :func:`torch.compile` the functions below trace into the graph
(:mod:`fastbnf.ops.library`): the kernel ops inside :class:`torch.autograd.Function`\ s where
the device has compiled kernels, the custom ops (definitions, fakes, registered autograd)
elsewhere. In eager mode with compiled kernels they call the C++ autograd nodes of
:mod:`fastbnf.ops.native`; otherwise the :class:`torch.autograd.Function`\ s of
:mod:`fastbnf.ops.eager`, which run the same implementation. Every call shows in
:mod:`torch.profiler` as ``fastbnf::<name>``. :mod:`fastbnf.ops.dispatch` picks the backend of a
call; :mod:`fastbnf.ops.link` ties a KL to the next sample of its group.
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

from . import native
from .eager import _KL, _apply, _Sample, _Variance
from .library import TracedKL, TracedSample, traces_kernels, unflatten
from .link import Link
from .prior import STANDARD_NORMAL, Prior

# The differentiable functions the model calls.


def _traced_kernels(tensors: Sequence[Tensor]) -> bool:
    r"""Whether a compiled step calls the kernel ops on these tensors (their device has compiled
    kernels) rather than the public ops (the pure-PyTorch twin, or an empty group, for which the
    public op raises the contract's error)."""

    return len(tensors) > 0 and traces_kernels(tensors[0].device.type)


def sample(
    means: Sequence[Tensor],
    logvars: Sequence[Tensor],
    n: int | None = None,
    out_dtype: torch.dtype | None = None,
    with_kl: bool = False,
    prior: Prior = STANDARD_NORMAL,
    stream: int = 0,
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
        stream: An integer folded into the noise's key (the data-parallel rank).
        split: Whether to return the samples as one view per tensor, shaped like it (with a
            leading dim of size ``n``), rather than flat.
        link: The :class:`Link` of a KL of the same tensors, drawn without ``with_kl`` (eager
            mode only): their backward is then one kernel call.

    Returns:
        The samples, flat with shape :math:`(N)` or :math:`(n, N)` or split, the KL divergence
        (zero unless ``with_kl``), and the ``(seed, offset)`` state the noise was drawn from.
    """

    if link is not None:
        if with_kl:
            raise ValueError("sample() takes a link only without with_kl")
        # Read by the sample, but not its inputs: the KL's node has their edges.
        linked_tensors = link.take(means, logvars)
        if not link.token.requires_grad:
            link = None  # the KL's node would not run in the backward

    options = (n, out_dtype, with_kl, *prior, stream)
    if torch.compiler.is_compiling():
        if _traced_kernels(means):
            theta, kl, rng_state = TracedSample.apply(len(means), options, *means, *logvars)
        else:
            theta, kl, rng_state = torch.ops.fastbnf.sample(list(means), list(logvars), *options)
        return (unflatten(theta, means) if split else theta), kl, rng_state

    # The C++ nodes draw one sample at a time, and take a link only from a KL of theirs.
    module = native.usable(means) if n is None else None
    if module is not None and (link is None or link.native):
        token = None if link is None else link.token
        *theta, kl, rng_state = native.sample(
            module, means, logvars, out_dtype, with_kl, prior, stream, split, token
        )
        return (theta if split else theta[0]), kl, rng_state
    if link is not None and link.native:
        link = None  # not followed here: the KL's node then computes the KL's gradients alone

    if link is None:
        *theta, kl, rng_state = _apply(_Sample, options, split, None, None, *means, *logvars)
    else:
        *theta, kl, rng_state = _apply(_Sample, options, split, link, linked_tensors, link.token)
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
        if _traced_kernels(means):
            return TracedKL.apply(len(means), tuple(prior), *means, *logvars)
        return torch.ops.fastbnf.kl(list(means), list(logvars), *prior)
    linked = link is not None and torch.is_grad_enabled()
    module = native.usable(means)
    if module is not None:
        outputs = native.kl(module, means, logvars, prior, linked)
    elif linked:
        outputs = _apply(_KL, prior, link, *means, *logvars)
    else:
        return _apply(_KL, prior, None, *means, *logvars)
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

    if torch.compiler.is_compiling():
        return torch.ops.fastbnf.variance(list(logvars))
    return _apply(_Variance, *logvars)
