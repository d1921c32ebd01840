r"""The op boundary: the ops, their fake kernels and autograd, and the backend choice.

The public ops ``torch.ops.fastbnf.*`` are declared from :mod:`fastbnf._schemas` and implemented
here: each call runs the compiled kernel op ``fastbnf::<name>_kernel`` or the pure-PyTorch twin
in :mod:`fastbnf.reference`, as :func:`fastbnf.backend` says for the device at call time.

Two paths lead to them. Under :func:`torch.compile` the differentiable functions below call
the custom ops, whose fake kernels and autograd are registered here, so a training step traces
without graph breaks. In eager mode they call a :class:`torch.autograd.Function` that runs the
same implementation directly: a custom op's Python dispatch costs a few hundred microseconds per
call, as much as a whole step of a small model. Either way every call shows in
:mod:`torch.profiler` as ``fastbnf::<name>``.
"""

__all__ = [
    "Link",
    "kl",
    "sample",
    "unflatten",
    "variance",
]

import functools
import torch

from collections.abc import Sequence
from contextlib import nullcontext
from operator import attrgetter, is_
from torch import Tensor

from . import _compat, reference
from ._backend import backend, extension_loaded
from ._schemas import KERNEL_SUFFIX, SCHEMAS

_LIBRARY = torch.library.Library("fastbnf", "FRAGMENT")

for _name, _schema in SCHEMAS.items():
    _LIBRARY.define(f"{_name}{KERNEL_SUFFIX}{_schema}")


def _device(tensors: Sequence[Tensor]) -> torch.device | None:
    return tensors[0].device if len(tensors) > 0 else None


def _run(name: str, device: torch.device | None, *args):
    r"""Runs an op on the backend that :func:`fastbnf.backend` names for the device.

    Without a device (an empty group) the twin runs: it raises the contract's error, where a
    kernel op given no tensor could not even be dispatched."""

    if device is None or backend(device) == "torch":
        return getattr(reference, name)(*args)
    return getattr(torch.ops.fastbnf, name + KERNEL_SUFFIX)(*args)


# The public custom ops; their implementations pick the backend at call time.


@torch.library.custom_op("fastbnf::sample", mutates_args=(), schema=SCHEMAS["sample"])
def _sample_op(means, logvars, n, out_dtype, with_kl, prior_var, prior_vars, prior_means, stream):
    args = (means, logvars, n, out_dtype, with_kl, prior_var, prior_vars, prior_means, stream)
    return _run("sample", _device(means), *args)


@torch.library.custom_op(
    "fastbnf::sample_backward", mutates_args=(), schema=SCHEMAS["sample_backward"]
)
def _sample_backward_op(
    grad_theta, grad_kl, means, logvars, rng_state, with_kl, prior_var, prior_vars, prior_means
):
    args = (grad_theta, grad_kl, means, logvars, rng_state, with_kl, prior_var, prior_vars)
    return _run("sample_backward", grad_theta.device, *args, prior_means)


@torch.library.custom_op("fastbnf::kl", mutates_args=(), schema=SCHEMAS["kl"])
def _kl_op(means, logvars, prior_var, prior_vars, prior_means):
    return _run("kl", _device(means), means, logvars, prior_var, prior_vars, prior_means)


@torch.library.custom_op("fastbnf::kl_backward", mutates_args=(), schema=SCHEMAS["kl_backward"])
def _kl_backward_op(grad_kl, means, logvars, prior_var, prior_vars, prior_means):
    args = (grad_kl, means, logvars, prior_var, prior_vars, prior_means)
    return _run("kl_backward", _device(means), *args)


@torch.library.custom_op("fastbnf::variance", mutates_args=(), schema=SCHEMAS["variance"])
def _variance_op(logvars):
    return _run("variance", _device(logvars), logvars)


# Fake kernels: shapes and dtypes only, for torch.compile and opcheck.


def _numel(tensors: Sequence[Tensor]) -> int:
    return sum(t.numel() for t in tensors)


def _flat_like(tensors: Sequence[Tensor], shape, dtype=None) -> Tensor:
    if len(tensors) == 0:
        return torch.empty(shape, dtype=dtype)
    return tensors[0].new_empty(shape, dtype=dtype)


def _fake_sample(
    means, logvars, n, out_dtype, with_kl, prior_var, prior_vars, prior_means, stream
):
    shape = (_numel(means),) if n is None else (n, _numel(means))
    theta = _flat_like(means, shape, out_dtype)
    return theta, _flat_like(means, ()), _flat_like(means, (2,), torch.int64)


def _fake_grads(means):
    return _flat_like(means, (_numel(means),)), _flat_like(means, (_numel(means),))


def _fake_sample_backward(grad_theta, grad_kl, means, *args):
    return _fake_grads(means)


def _fake_kl_backward(grad_kl, means, *args):
    return _fake_grads(means)


def _fake_kl(means, logvars, prior_var, prior_vars, prior_means):
    return _flat_like(means, ())


def _fake_variance(logvars):
    return _flat_like(logvars, (_numel(logvars),))


_FAKES = {
    "sample": _fake_sample,
    "sample_backward": _fake_sample_backward,
    "kl": _fake_kl,
    "kl_backward": _fake_kl_backward,
    "variance": _fake_variance,
}

# The kernel ops get the same fakes, so that opcheck can test them on their own.
for _name, _fake in _FAKES.items():
    torch.library.register_fake(f"fastbnf::{_name}", _fake)
    torch.library.register_fake(f"fastbnf::{_name}{KERNEL_SUFFIX}", _fake, lib=_LIBRARY)


# Autograd of the custom ops (the traced path).


def unflatten(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    r"""Splits a flat tensor into views shaped like a list of tensors.

    One :func:`torch.split_with_sizes` and views, not one ``narrow`` per tensor: the backward of
    the latter adds every gradient into a full-size buffer, quadratic in the number of tensors.

    Arguments:
        flat: A flat tensor, with as many elements as the tensors together along its last dim.
        like: The tensors whose shapes to take.

    Returns:
        The views, one per tensor.
    """

    lead = flat.shape[:-1]
    pieces = flat.split_with_sizes([t.numel() for t in like], dim=-1)
    return [piece.view((*lead, *t.shape)) for piece, t in zip(pieces, like, strict=True)]


def _no_grads(inputs) -> tuple:
    r"""The gradients of non-differentiable inputs, shaped as autograd expects them: one
    :py:`None` per tensor of a list of tensors, one per anything else."""

    return tuple(
        [None] * len(x)
        if isinstance(x, (list, tuple)) and x and isinstance(x[0], Tensor)
        else None
        for x in inputs
    )


def _setup_sample(ctx, inputs, output):
    means, logvars, n, out_dtype, with_kl, prior_var, prior_vars, prior_means, stream = inputs
    ctx.options = (with_kl, prior_var, prior_vars, prior_means)
    ctx.save_for_backward(*means, *logvars, output[2])
    ctx.count = len(means)
    ctx.no_grads = _no_grads(inputs[2:])


def _sample_autograd(ctx, grad_theta, grad_kl, grad_rng):
    saved = ctx.saved_tensors
    means, logvars = saved[: ctx.count], saved[ctx.count : 2 * ctx.count]
    rng_state = saved[-1]
    grad_mu, grad_logvar = torch.ops.fastbnf.sample_backward(
        grad_theta, grad_kl, means, logvars, rng_state, *ctx.options
    )
    return unflatten(grad_mu, means), unflatten(grad_logvar, logvars), *ctx.no_grads


_sample_op.register_autograd(_sample_autograd, setup_context=_setup_sample)


def _setup_kl(ctx, inputs, output):
    means, logvars, *options = inputs
    ctx.options = tuple(options)
    ctx.save_for_backward(*means, *logvars)
    ctx.count = len(means)
    ctx.no_grads = _no_grads(options)


def _kl_autograd(ctx, grad_kl):
    saved = ctx.saved_tensors
    means, logvars = saved[: ctx.count], saved[ctx.count :]
    grad_mu, grad_logvar = torch.ops.fastbnf.kl_backward(grad_kl, means, logvars, *ctx.options)
    return unflatten(grad_mu, means), unflatten(grad_logvar, logvars), *ctx.no_grads


_kl_op.register_autograd(_kl_autograd, setup_context=_setup_kl)


def _variance_grad(grad: Tensor, logvars: Sequence[Tensor]) -> list[Tensor]:
    flat = torch.cat([lv.reshape(-1) for lv in logvars])
    grad_flat = grad * reference.softclip(flat).exp() * reference.softclip_grad(flat)
    return unflatten(grad_flat, logvars)


def _setup_variance(ctx, inputs, output):
    ctx.save_for_backward(*inputs[0])


def _variance_autograd(ctx, grad):
    return _variance_grad(grad, ctx.saved_tensors)


_variance_op.register_autograd(_variance_autograd, setup_context=_setup_variance)


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
        n, out_dtype, with_kl, prior_var, prior_vars, prior_means, stream = options
        tensors = inputs if link is None else linked_tensors
        count = len(tensors) // 2
        means, logvars = tensors[:count], tensors[count:]

        with _profiled("fastbnf::sample"):
            theta, divergence, rng_state = _run("sample", _device(means), means, logvars, *options)

        ctx.options = (with_kl, prior_var, prior_vars, prior_means)
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


def _sample_backward(grad_theta, grad_kl, means, logvars, rng_state, *options) -> list[Tensor]:
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
            *options,
        )
    return [*_views(grad_mu, means), *_views(grad_logvar, logvars)]


class Link:
    r"""Ties a group's KL divergence to the next sample of the same group, the seed-style
    ``kl_divergence()`` then ``reparameterize()``, so that one kernel call computes the
    gradients of both, as with ``return_kl``.

    The sample takes :attr:`token`, an output of the KL's node, as its only input: autograd then
    runs the sample's backward first. It leaves its flat gradient in :attr:`stash`; the KL's
    backward hands both gradients to one ``sample_backward`` call. Each parameter then receives
    one gradient, from one node.
    """

    __slots__ = ("tensors", "token", "stash", "taken")

    def __init__(self) -> None:
        self.tensors: tuple[Tensor, ...] = ()
        self.token: Tensor | None = None
        self.stash: tuple | None = None
        self.taken = False

    def take(self, means: Sequence[Tensor], logvars: Sequence[Tensor]) -> tuple[Tensor, ...]:
        r"""Checks that a sample of these tensors may take the link, marks it taken, and
        returns the tensors, means then log-variances."""

        tensors = (*means, *logvars)
        if self.token is None or self.taken:
            raise ValueError("a Link is taken by one sample, after a kl(link=...) call")
        # Identity, compared in C (map over operator.is_): this runs every step.
        if len(tensors) != len(self.tensors) or not all(map(is_, tensors, self.tensors)):
            raise ValueError("the Link comes from a KL of other tensors than this sample's")
        self.taken = True
        return tensors


class _KL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, options, link, *tensors):
        count = len(tensors) // 2
        means, logvars = tensors[:count], tensors[count:]

        with _profiled("fastbnf::kl"):
            divergence = _run("kl", _device(means), means, logvars, *options)

        ctx.options = options
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
                grad_theta, grad_kl, means, logvars, rng_state, with_kl, *ctx.options
            )
            return None, None, *grads

        if grad_kl is None:
            return None, None, *([None] * (2 * ctx.count))
        tensors = ctx.kept.get("kl")
        means, logvars = tensors[: ctx.count], tensors[ctx.count :]
        with _profiled("fastbnf::kl_backward"):
            grad_mu, grad_logvar = _run(
                "kl_backward", _device(means), grad_kl, means, logvars, *ctx.options
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


# The differentiable functions the model calls.


def sample(
    means: Sequence[Tensor],
    logvars: Sequence[Tensor],
    n: int | None = None,
    out_dtype: torch.dtype | None = None,
    with_kl: bool = False,
    prior_var: float = 1.0,
    prior_vars: Sequence[float] | None = None,
    prior_means: Sequence[Tensor] | None = None,
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
        prior_var: The variance of the prior.
        prior_vars: Per-tensor prior variances, overriding ``prior_var``.
        prior_means: Per-tensor prior means (by default zero).
        stream: An integer folded into the noise's key (the data-parallel rank).
        split: Whether to return the samples as one view per tensor, shaped like it (with a
            leading dim of size ``n``), rather than flat.
        link: The :class:`Link` of a KL of the same tensors, drawn without ``with_kl`` (eager
            mode only): their backward is then one kernel call.

    Returns:
        The samples, flat with shape :math:`(N)` or :math:`(n, N)` or split, the KL divergence
        (zero unless ``with_kl``), and the ``(seed, offset)`` state the noise was drawn from.
    """

    options = (n, out_dtype, with_kl, prior_var, prior_vars, prior_means, stream)
    if link is not None:
        if with_kl:
            raise ValueError("sample() takes a link only without with_kl")
        # Read by the sample, but not its inputs: the KL's node has their edges.
        linked_tensors = link.take(means, logvars)
        if not link.token.requires_grad:
            link = None  # the KL's node would not run in the backward

    if torch.compiler.is_compiling():
        theta, kl, rng_state = torch.ops.fastbnf.sample(list(means), list(logvars), *options)
        return (unflatten(theta, means) if split else theta), kl, rng_state

    if link is None:
        *theta, kl, rng_state = _apply(_Sample, options, split, None, None, *means, *logvars)
    else:
        *theta, kl, rng_state = _apply(_Sample, options, split, link, linked_tensors, link.token)
    return (theta if split else theta[0]), kl, rng_state


def kl(
    means: Sequence[Tensor],
    logvars: Sequence[Tensor],
    prior_var: float = 1.0,
    prior_vars: Sequence[float] | None = None,
    prior_means: Sequence[Tensor] | None = None,
    link: Link | None = None,
) -> Tensor:
    r"""Returns the KL divergence between a group's posterior and its prior.

    Arguments:
        means: The posterior means of the group's tensors.
        logvars: Their posterior log-variances.
        prior_var: The variance of the prior.
        prior_vars: Per-tensor prior variances, overriding ``prior_var``.
        prior_means: Per-tensor prior means (by default zero).
        link: A fresh :class:`Link`, to pass to the :func:`sample` of the same tensors that
            follows (eager mode, with gradients; ignored otherwise).

    Returns:
        The KL divergence, a 0-dim tensor.
    """

    options = (prior_var, prior_vars, prior_means)

    if torch.compiler.is_compiling():
        return torch.ops.fastbnf.kl(list(means), list(logvars), *options)
    if link is None or not torch.is_grad_enabled():
        return _apply(_KL, options, None, *means, *logvars)
    divergence, link.token = _apply(_KL, options, link, *means, *logvars)
    link.tensors = (*means, *logvars)
    return divergence


def variance(logvars: Sequence[Tensor]) -> Tensor:
    r"""Returns the flat posterior variances :math:`\exp(\mathrm{softclip}(\log \sigma^2))`.

    Arguments:
        logvars: The posterior log-variances of a group's tensors.
    """

    if torch.compiler.is_compiling():
        return torch.ops.fastbnf.variance(list(logvars))
    return _apply(_Variance, *logvars)
