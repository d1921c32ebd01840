r"""The ops as :mod:`torch.library` sees them: the kernel ops' definitions, the public custom
ops (which pick the backend at call time), their fake kernels, and the autograd registered for
them. This is the path :func:`torch.compile` traces.
"""

import torch

from collections.abc import Sequence
from torch import Tensor

from .. import reference
from .._backend import backend
from .._schemas import KERNEL_SUFFIX, SCHEMAS
from .dispatch import _device, _run

_LIBRARY = torch.library.Library("fastbnf", "FRAGMENT")

for _name, _schema in SCHEMAS.items():
    _LIBRARY.define(f"{_name}{KERNEL_SUFFIX}{_schema}")


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


def _fake_adam_step(grad_theta, *args):
    return grad_theta.new_empty((2,), dtype=torch.int64)


# The fused optimizer step has a kernel op and no public op.
torch.library.register_fake(f"fastbnf::adam_step{KERNEL_SUFFIX}", _fake_adam_step, lib=_LIBRARY)


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


@torch.compiler.assume_constant_result
def traces_kernels(device_type: str) -> bool:
    r"""Whether a compiled step calls the kernel ops on a device type (its backend is compiled)
    rather than the public ops (the pure-PyTorch twin). Decided when the step is traced, as a
    constant: a later ``FASTBNF_BACKEND`` does not change a compiled graph."""

    return backend(device_type) != "torch"


# The compiled kernels in a compiled step: autograd.Functions that dynamo traces into the graph,
# around the kernel ops, which have no autograd kernel of their own. A compiled graph calls them
# through the dispatcher alone, where an op with autograd registered in Python (the public ops)
# costs several times the kernels' own host time on every call.


class TracedSample(torch.autograd.Function):
    @staticmethod
    def forward(ctx, count, options, *tensors):
        means, logvars = list(tensors[:count]), list(tensors[count:])
        theta, kl, rng_state = torch.ops.fastbnf.sample_kernel(means, logvars, *options)
        ctx.count = count
        n, out_dtype, with_kl, *prior, stream = options
        ctx.options = (with_kl, *prior)
        ctx.save_for_backward(*tensors, rng_state)
        ctx.mark_non_differentiable(rng_state)
        return theta, kl, rng_state

    @staticmethod
    def backward(ctx, grad_theta, grad_kl, _):
        *tensors, rng_state = ctx.saved_tensors
        means, logvars = tensors[: ctx.count], tensors[ctx.count :]
        grad_mu, grad_logvar = torch.ops.fastbnf.sample_backward_kernel(
            grad_theta, grad_kl, means, logvars, rng_state, *ctx.options
        )
        return None, None, *unflatten(grad_mu, means), *unflatten(grad_logvar, logvars)


class TracedKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, count, prior, *tensors):
        means, logvars = list(tensors[:count]), list(tensors[count:])
        ctx.count = count
        ctx.prior = prior
        ctx.save_for_backward(*tensors)
        return torch.ops.fastbnf.kl_kernel(means, logvars, *prior)

    @staticmethod
    def backward(ctx, grad_kl):
        tensors = ctx.saved_tensors
        means, logvars = tensors[: ctx.count], tensors[ctx.count :]
        grad_mu, grad_logvar = torch.ops.fastbnf.kl_backward_kernel(
            grad_kl, means, logvars, *ctx.prior
        )
        return None, None, *unflatten(grad_mu, means), *unflatten(grad_logvar, logvars)
