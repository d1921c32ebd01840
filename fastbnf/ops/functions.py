r"""The ops' Python autograd path: one :class:`torch.autograd.Function` per op.

Every call that the C++ autograd nodes (:mod:`fastbnf.ops.native`) do not take runs here: the
pure-PyTorch backend, functorch transforms, several samples at once, links to a KL of the
Python path, and :func:`torch.compile`, which traces these same functions into its graph. The
C++ nodes and these functions hold each other to the same gradients and errors
(``tests/test_autograd_paths.py``).

In eager mode the functions call the implementation directly (:func:`fastbnf.ops.dispatch.run`),
keep the parameters by reference (:class:`_Kept`) rather than saved, and refuse double
backward. Under :func:`torch.compile` they save their tensors, as a traced graph needs, and
call opaque ops that the graph keeps.
"""

__all__ = ["KL", "Sample", "Variance", "apply"]

import functools
import torch

from collections.abc import Sequence
from operator import attrgetter
from torch import Tensor

from .. import _compat
from .._flat import flatten, views
from ..reference import softclip, softclip_grad
from .dispatch import device_of, run
from .prior import Prior


def apply(function: type[torch.autograd.Function], *args):
    r"""``function.apply(*args)``: past its scan of the arguments in eager mode
    (:func:`fastbnf._compat.apply_function`), the usual one under :func:`torch.compile`, which
    traces that one."""

    if torch.compiler.is_compiling():
        return function.apply(*args)
    return _compat.apply_function(function, *args)


_VERSION = attrgetter("_version")


def _version_sum(tensors: Sequence[Tensor]) -> int:
    # map over attrgetter runs in C, cheaper than a dispatched op over the list.
    return sum(map(_VERSION, tensors))


def _call(name: str, device: torch.device | None, *args):
    r""":func:`fastbnf.ops.dispatch.run`, inside a :mod:`torch.profiler` range of the op's name
    while a profiler runs in eager mode (a compiled graph shows its ops by themselves). Without
    a profiler no range is entered: a ``record_function`` costs host time even then, on every
    op call of every step (``benchmarks/host_phases.py`` shows it)."""

    if torch.compiler.is_compiling() or not _compat.profiler_enabled():
        return run(name, device, *args)
    with torch.profiler.record_function(f"fastbnf::{name}"):
        return run(name, device, *args)


def _first_order(op: str):
    r"""Decorates a backward that refuses to build a graph (``create_graph=True``): the ops
    have no second derivatives, and their gradients must not pass for differentiable ones.
    Without a graph to build, the engine runs backwards with gradients off already. (A
    compiled graph's backward is traced, not run by the engine: it is not checked.)"""

    def decorate(backward):
        @functools.wraps(backward)
        def checked(ctx, *grads):
            if torch.is_grad_enabled() and not torch.compiler.is_compiling():
                raise RuntimeError(
                    f"fastbnf::{op} has no second derivatives: a backward with "
                    "create_graph=True (a gradient penalty, a Hessian-vector product) through "
                    "the samples or the KL is not supported."
                )
            return backward(ctx, *grads)

        return checked

    return decorate


class _Kept:
    r"""The parameters an op reads again in its backward, kept by reference (eager mode).

    Parameters are leaves, so a reference makes no cycle, and it costs far less than
    ``save_for_backward``, whose packing and unpacking is per tensor: for the hundreds of
    tensors of a group, more than the kernels (``benchmarks/bench_step.py``). Autograd's
    in-place check is done here instead: versions only grow, so an unchanged sum means no
    tensor was modified in place.
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


def _keep(ctx, tensors: Sequence[Tensor], *extra: Tensor) -> None:
    r"""Keeps the tensors a backward reads: by reference in eager mode, saved under
    :func:`torch.compile` (which traces what a backward reads from what was saved)."""

    if torch.compiler.is_compiling():
        ctx.kept = None
        ctx.save_for_backward(*tensors, *extra)
    else:
        ctx.kept = _Kept(tensors)
        ctx.extra = extra


def _kept(ctx, op: str) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...], int | None]:
    r"""What :func:`_keep` kept: the tensors (checked for in-place changes), the extra tensors
    and the tensors' version sum (:py:`None` under :func:`torch.compile`)."""

    if ctx.kept is None:
        saved = ctx.saved_tensors
        count = 2 * ctx.count
        return saved[:count], saved[count:], None
    version = _version_sum(ctx.kept.tensors)
    return ctx.kept.get(op, version), ctx.extra, version


class Sample(torch.autograd.Function):
    r"""The Python path of :func:`fastbnf.ops.sample`. With ``split``, it returns the
    per-tensor views of the samples as its own outputs: one autograd node per group instead of
    a split and one view node per tensor, and their gradients are flattened in C++.

    Linked to a KL (:class:`fastbnf.ops.Link`), its only input is the link's token: it has no
    edge to the parameters, whose gradients the KL's backward computes.
    """

    @staticmethod
    def forward(ctx, options, split, link, linked_tensors, *inputs):
        n, out_dtype, with_kl, *prior, salt = options
        tensors = inputs if link is None else linked_tensors
        count = len(tensors) // 2
        means, logvars = tensors[:count], tensors[count:]

        theta, divergence, rng_state = _call("sample", device_of(means), means, logvars, *options)

        ctx.options = (with_kl, Prior(*prior))
        ctx.count = count
        ctx.split = split and count > 0
        ctx.n = n
        ctx.link = link
        # In eager mode the state is kept, not saved: a non-differentiable output makes no
        # reference cycle, and it outlives the first backward, so that the loss and the KL
        # (with_kl) can be backpropagated by separate calls, as with zuko.
        _keep(ctx, tensors, rng_state)
        ctx.mark_non_differentiable(rng_state)

        if ctx.split:
            return *views(theta, means), divergence, rng_state
        return theta, divergence, rng_state

    @staticmethod
    @_first_order("sample")
    def backward(ctx, *grads):
        tensors, (rng_state,), version = _kept(ctx, "sample")
        means, logvars = tensors[: ctx.count], tensors[ctx.count :]
        *grad_samples, grad_kl, _ = grads
        grad_theta = flatten(grad_samples, ctx.n) if ctx.split else grad_samples[0]

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

    args = (grad_theta, grad_kl, means, logvars, rng_state, with_kl, *prior)
    grad_mu, grad_logvar = _call("sample_backward", grad_theta.device, *args)
    return [*views(grad_mu, means), *views(grad_logvar, logvars)]


class KL(torch.autograd.Function):
    r"""The Python path of :func:`fastbnf.ops.kl`. With a :class:`fastbnf.ops.Link`, it also
    returns the link's token, and its backward computes the gradients of the linked sample."""

    @staticmethod
    def forward(ctx, prior, link, *tensors):
        count = len(tensors) // 2
        means, logvars = tensors[:count], tensors[count:]

        divergence = _call("kl", device_of(means), means, logvars, *prior)

        ctx.prior = prior
        ctx.count = count
        ctx.link = link
        _keep(ctx, tensors)
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
        tensors, _, _ = _kept(ctx, "kl")
        means, logvars = tensors[: ctx.count], tensors[ctx.count :]
        args = (grad_kl, means, logvars, *ctx.prior)
        grad_mu, grad_logvar = _call("kl_backward", device_of(means), *args)
        return None, None, *views(grad_mu, means), *views(grad_logvar, logvars)


class Variance(torch.autograd.Function):
    r"""The Python path of :func:`fastbnf.ops.variance`, on every backend: its backward is
    a few elementwise ops, in PyTorch."""

    @staticmethod
    def forward(ctx, *logvars):
        out = _call("variance", device_of(logvars), logvars)
        ctx.save_for_backward(*logvars)
        return out

    @staticmethod
    @_first_order("variance")
    def backward(ctx, grad):
        logvars = ctx.saved_tensors
        flat = torch.cat([lv.reshape(-1) for lv in logvars])
        grad_flat = grad * softclip(flat).exp() * softclip_grad(flat)
        return tuple(views(grad_flat, logvars))
