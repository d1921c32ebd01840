r"""The eager path of the ops: :class:`torch.autograd.Function`s that call the same
implementation as the custom ops directly, without their Python dispatch (a few hundred
microseconds per call, as much as a whole step of a small model)."""

import functools
import torch

from collections.abc import Sequence
from contextlib import nullcontext
from operator import attrgetter
from torch import Tensor

from .. import _compat
from .._backend import extension_loaded
from .dispatch import _device, _run
from .library import _variance_grad, unflatten
from .prior import Prior

# The eager path: the same implementations behind autograd.Functions.


def _views(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    r"""Views of a flat tensor shaped like a list of tensors, made in C++: by the extension's
    ``fastbnf::views_like`` when it is loaded (one tensor per piece, about four times faster),
    else by ATen's ``unflatten_dense_tensors``.

    For untracked tensors only (inside an autograd.Function): the views it makes are narrows,
    whose backward would be quadratic in the number of tensors (see :func:`unflatten`).
    """

    if flat.dim() == 1 and len(like) > 0:
        if extension_loaded():
            return torch.ops.fastbnf.views_like(flat, list(like))
        return _compat.unflatten_dense(flat, like)
    with torch.no_grad():
        return unflatten(flat, like)


def _adjacent(grads: Sequence[Tensor]) -> Tensor | None:
    r"""One flat tensor over the gradients when they are contiguous and back to back in one
    storage, in order (what the backward of ``torch.cat`` over the samples hands back), else
    :py:`None`. The extension's ``fastbnf::adjacent_flat`` when it is loaded.

    Here only the first and the last are checked for their storage: the others lie between
    them, in memory that the first one's storage holds.
    """

    if extension_loaded():
        return torch.ops.fastbnf.adjacent_flat(grads)

    first, last = grads[0], grads[-1]
    storage = first.untyped_storage()
    if last.untyped_storage().data_ptr() != storage.data_ptr():
        return None
    size = first.element_size()
    start = end = first.data_ptr()
    for g in grads:
        if g.data_ptr() != end or not g.is_contiguous():
            return None
        end += g.numel() * size
    if end > storage.data_ptr() + storage.nbytes():
        return None
    return first.as_strided(((end - start) // size,), (1,))


def _flatten(grads: Sequence[Tensor], n: int | None) -> Tensor:
    r"""The flat gradient of the samples from the gradients of their per-tensor views."""

    if n is None:
        flat = _adjacent(grads)
        if flat is not None:
            return flat
        return _compat.flatten_dense(grads)
    return torch.cat([g.reshape(n, -1) for g in grads], dim=1)


_VERSION = attrgetter("_version")


def _version_sum(tensors: Sequence[Tensor]) -> int:
    # map over attrgetter runs in C: about 0.1 µs a tensor, less than a dispatched op whose
    # list argument alone costs 0.2 µs a tensor to convert.
    return sum(map(_VERSION, tensors))


_apply = _compat.apply_function


def _profiled(name: str):
    r"""A :mod:`torch.profiler` range named ``name`` while a profiler runs, else nothing:
    entering a ``record_function`` costs about 20 µs even with no profiler, several percent
    of a small model's step for each of the step's op calls."""

    if _compat.profiler_enabled():
        return torch.profiler.record_function(name)
    return nullcontext()


def _first_order(op: str):
    r"""Decorates a backward that refuses to build a graph (``create_graph=True``): the ops
    have no second derivatives, and their gradients must not pass for differentiable ones.
    Without a graph to build, the engine runs backwards with gradients off already."""

    def decorate(backward):
        @functools.wraps(backward)
        def checked(ctx, *grads):
            if torch.is_grad_enabled():
                raise RuntimeError(
                    f"fastbnf::{op} has no second derivatives: a backward with "
                    "create_graph=True (a gradient penalty, a Hessian-vector product) through "
                    "the samples or the KL is not supported."
                )
            return backward(ctx, *grads)

        return checked

    return decorate


class _Kept:
    r"""The parameters an eager op reads again in its backward, kept by reference.

    Parameters are leaves, so a reference makes no cycle, and it costs far less than
    ``save_for_backward``, whose packing and unpacking take about 2 µs per tensor: milliseconds
    for the hundreds of tensors of a group. Autograd's in-place check is done here instead:
    versions only grow, so an unchanged sum means no tensor was modified in place.
    """

    __slots__ = ("tensors", "version")

    def __init__(self, tensors: Sequence[Tensor]) -> None:
        self.tensors = tuple(tensors)
        self.version = _version_sum(self.tensors)

    def get(self, op: str, version: int | None = None) -> tuple[Tensor, ...]:
        r"""The tensors, after the in-place check; ``version`` is their current version sum,
        when the caller has it already."""

        if (_version_sum(self.tensors) if version is None else version) != self.version:
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an "
                f"inplace operation: a mean or log-variance read by fastbnf::{op} changed between "
                "its forward and its backward (an optimizer step in between?)."
            )
        return self.tensors


class _Sample(torch.autograd.Function):
    r"""The eager path of :func:`sample`. With ``split``, it returns the per-tensor views of the
    samples as its own outputs: one autograd node per group instead of a split and one view
    node per tensor, and their gradients are flattened in C++.

    Linked to a KL (:class:`Link`), its only input is the link's token: it has no edge to the
    parameters, whose gradients the KL's backward computes.
    """

    @staticmethod
    def forward(ctx, options, split, link, linked_tensors, *inputs):
        n, out_dtype, with_kl, *prior, stream = options
        tensors = inputs if link is None else linked_tensors
        count = len(tensors) // 2
        means, logvars = tensors[:count], tensors[count:]

        with _profiled("fastbnf::sample"):
            theta, divergence, rng_state = _run("sample", _device(means), means, logvars, *options)

        ctx.options = (with_kl, Prior(*prior))
        ctx.count = count
        ctx.split = split and count > 0
        ctx.n = n
        ctx.link = link
        ctx.kept = _Kept(tensors)
        # An attribute, not a saved tensor: a non-differentiable output makes no reference
        # cycle, and it outlives the first backward, so that the loss and the KL (with_kl) can
        # be backpropagated by separate calls, as with zuko.
        ctx.rng_state = rng_state
        ctx.mark_non_differentiable(rng_state)

        if ctx.split:
            return *_views(theta, means), divergence, rng_state
        return theta, divergence, rng_state

    @staticmethod
    @_first_order("sample")
    def backward(ctx, *grads):
        rng_state = ctx.rng_state
        version = _version_sum(ctx.kept.tensors)
        tensors = ctx.kept.get("sample", version)
        means, logvars = tensors[: ctx.count], tensors[ctx.count :]
        *grad_samples, grad_kl, _ = grads
        grad_theta = _flatten(grad_samples, ctx.n) if ctx.split else grad_samples[0]

        if ctx.link is not None:
            # The linked KL's backward, which runs next, computes the gradients of both. The
            # KL read the same tensors (Link.take), so this version sum serves its check too.
            ctx.link.stash = (grad_theta, rng_state, means, logvars, version)
            return None, None, None, None, grad_kl.new_zeros(())

        grads = _sample_backward(grad_theta, grad_kl, means, logvars, rng_state, *ctx.options)
        return None, None, None, None, *grads


def _sample_backward(
    grad_theta, grad_kl, means, logvars, rng_state, with_kl: bool, prior: Prior
) -> list[Tensor]:
    r"""The per-tensor gradients of the means, then of the log-variances, in one call."""

    with _profiled("fastbnf::sample_backward"):
        grad_mu, grad_logvar = _run(
            "sample_backward",
            grad_theta.device,
            grad_theta,
            grad_kl,
            means,
            logvars,
            rng_state,
            with_kl,
            *prior,
        )
    return [*_views(grad_mu, means), *_views(grad_logvar, logvars)]


class _KL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, prior, link, *tensors):
        count = len(tensors) // 2
        means, logvars = tensors[:count], tensors[count:]

        with _profiled("fastbnf::kl"):
            divergence = _run("kl", _device(means), means, logvars, *prior)

        ctx.prior = prior
        ctx.count = count
        ctx.link = link
        ctx.kept = _Kept(tensors)
        # A backward reached only through the token gets no KL gradient: None, not zeros.
        ctx.set_materialize_grads(False)
        if link is None:
            return divergence
        return divergence, divergence.new_zeros(())

    @staticmethod
    @_first_order("kl")
    def backward(ctx, grad_kl, *_):
        stash = None
        if ctx.link is not None:
            stash, ctx.link.stash = ctx.link.stash, None

        if stash is not None:
            # The tensors the sample was drawn from (checked by the sample's backward); the
            # KL's own are checked only when its gradient is needed.
            grad_theta, rng_state, means, logvars, version = stash
            with_kl = grad_kl is not None
            if with_kl:
                ctx.kept.get("kl", version)
            else:
                grad_kl = grad_theta.new_zeros((), dtype=means[0].dtype)
            grads = _sample_backward(
                grad_theta, grad_kl, means, logvars, rng_state, with_kl, ctx.prior
            )
            return None, None, *grads

        if grad_kl is None:
            return None, None, *([None] * (2 * ctx.count))
        tensors = ctx.kept.get("kl")
        means, logvars = tensors[: ctx.count], tensors[ctx.count :]
        with _profiled("fastbnf::kl_backward"):
            grad_mu, grad_logvar = _run(
                "kl_backward", _device(means), grad_kl, means, logvars, *ctx.prior
            )
        return None, None, *_views(grad_mu, means), *_views(grad_logvar, logvars)


class _Variance(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *logvars):
        with _profiled("fastbnf::variance"):
            out = _run("variance", _device(logvars), logvars)

        ctx.save_for_backward(*logvars)
        return out

    @staticmethod
    @_first_order("variance")
    def backward(ctx, grad):
        return tuple(_variance_grad(grad, ctx.saved_tensors))
