r"""The op library: every schema and fake kernel of fastbnf's ops, declared once.

A leaf: it imports nothing of fastbnf, so that the ops exist (for the extension to register
kernels to, for :func:`torch.compile` to trace) before anything else is loaded.

Every op exists twice with the same schema: the public op ``fastbnf::<name>``, implemented in
Python (:mod:`fastbnf.ops.dispatch` registers its implementation, which picks a backend at
call time), and the compiled kernel ``fastbnf::<name>_kernel``, whose CPU and CUDA
implementations the extension ``fastbnf._C`` registers. Declaring both here means the ops exist
whether or not the extension is built, and that C++ only ever registers implementations. No op
has autograd: the differentiable functions are :mod:`fastbnf.ops`' (``docs/design.md``).

For a group of T tensors (one device, one dtype) with N elements in all, in group order:

``sample(means, logvars, n, out_dtype, with_kl, prior_var, prior_vars, prior_means, salt)``
    returns ``(theta, kl, rng_state)``. ``theta`` is flat, ``(N,)`` when ``n`` is None and
    ``(n, N)`` otherwise, in ``out_dtype`` or the group's dtype; ``theta = mu + sigma * eps``
    with ``sigma = exp(softclip(logvar, 18) / 2)``. ``kl`` is a 0-dim tensor of the group's
    dtype, the KL divergence to the prior when ``with_kl`` and zero otherwise. ``rng_state``
    is an int64 ``(seed, offset)`` pair on the group's device from which ``eps`` can be
    regenerated; ``salt`` is folded into the seed (the data-parallel rank).
``sample_backward(grad_theta, grad_kl, means, logvars, rng_state, with_kl, prior_var,
prior_vars, prior_means)``
    returns the flat gradients ``(grad_means, grad_logvars)``, both ``(N,)`` in the group's
    dtype, summed over the ``n`` samples, with the KL's terms added when ``with_kl``.
``kl(means, logvars, prior_var, prior_vars, prior_means)`` and ``kl_backward(grad_kl, ...)``
    the KL alone and its flat gradients.
``variance(logvars)``
    the flat ``exp(softclip(logvar, 18))``, for the local reparameterization trick.
``adam_step(grad_theta, means, logvars, exp_avgs, exp_avg_sqs, theta, rng_state, step, lr,
beta1, beta2, eps, weight_decay, kl_weight, prior_var, prior_vars, prior_means, salt,
noise_offsets, step_tensor)``
    one step of :class:`fastbnf.optim.VariationalAdam` in place, and returns the
    ``rng_state`` of the next sample. With ``eps`` regenerated from ``rng_state`` and
    ``grad_theta`` the ``(N,)`` gradient of the data loss with respect to the sample ``theta``
    drawn from it,
    the means' and log-variances' gradients are ``sample_backward``'s with ``grad_kl =
    kl_weight``; AdamW (``csrc/common/adam_math.h``; ``weight_decay`` on the means only) then
    updates the means, the log-variances and their moments (``exp_avgs`` and ``exp_avg_sqs``,
    ``(2 N,)``: the means' then the log-variances'), and the next sample is drawn from the
    updated posterior with a new key into ``theta``. ``noise_offsets``, one per tensor, place
    the tensors in the noise stream: element ``e`` of tensor ``t`` draws the noise of flat
    index ``noise_offsets[t] + e`` (by default the tensor's offset in the group), so that
    shards of a group, each stepped on its own rank, draw their slices of the whole group's
    noise. ``step_tensor``, a one-element int64 tensor on the group's device, holds the step
    count in place of ``step`` (the capturable step: the CUDA kernel reads it on the device,
    so that a CUDA graph replays the step with the count of each replay). This kernel op has
    no public op in front of it: the optimizer calls it, or its twin, directly.

The prior of tensor t is ``N(m_t, v_t)`` with ``v_t = prior_vars[t]`` (or ``prior_var``) and
``m_t = prior_means[t]`` (or 0). Every backend checks the same input contract (dtypes, shapes,
devices, prior arguments; ``csrc/group.h`` and its twin :mod:`fastbnf._contract`), with the same
messages, and computes the per-element maths of ``csrc/common/posterior_math.h``.
"""

__all__ = ["KERNEL_SUFFIX", "LIBRARY", "OP_NAMES", "SCHEMAS"]

import torch

from collections.abc import Sequence
from torch import Tensor

_PRIOR = "float prior_var, float[]? prior_vars, Tensor[]? prior_means"

SCHEMAS: dict[str, str] = {
    "sample": (
        "(Tensor[] means, Tensor[] logvars, int? n, ScalarType? out_dtype, bool with_kl, "
        f"{_PRIOR}, int salt) -> (Tensor theta, Tensor kl, Tensor rng_state)"
    ),
    "sample_backward": (
        "(Tensor grad_theta, Tensor grad_kl, Tensor[] means, Tensor[] logvars, "
        f"Tensor rng_state, bool with_kl, {_PRIOR}) -> (Tensor grad_means, Tensor grad_logvars)"
    ),
    "kl": f"(Tensor[] means, Tensor[] logvars, {_PRIOR}) -> Tensor",
    "kl_backward": (
        f"(Tensor grad_kl, Tensor[] means, Tensor[] logvars, {_PRIOR}) "
        "-> (Tensor grad_means, Tensor grad_logvars)"
    ),
    "variance": "(Tensor[] logvars) -> Tensor",
    "adam_step": (
        "(Tensor grad_theta, Tensor(a!)[] means, Tensor(b!)[] logvars, Tensor(c!) exp_avgs, "
        "Tensor(d!) exp_avg_sqs, Tensor(e!) theta, Tensor rng_state, int step, float lr, "
        f"float beta1, float beta2, float eps, float weight_decay, float kl_weight, {_PRIOR}, "
        "int salt, int[]? noise_offsets=None, Tensor? step_tensor=None) -> Tensor next_rng_state"
    ),
}

#: The ops with a public op in front of their kernel op (all but the optimizer's step).
OP_NAMES = tuple(name for name in SCHEMAS if name != "adam_step")

KERNEL_SUFFIX = "_kernel"

#: The library fragment that owns the kernel ops' definitions (kept alive with this module).
LIBRARY = torch.library.Library("fastbnf", "FRAGMENT")

for _name, _schema in SCHEMAS.items():
    LIBRARY.define(f"{_name}{KERNEL_SUFFIX}{_schema}")


def _implemented_elsewhere(*args, **kwargs):
    raise NotImplementedError(
        "fastbnf: a public op ran before fastbnf.ops.dispatch registered its implementation."
    )


# The public ops, whose implementations fastbnf.ops.dispatch registers for every device.
for _name in OP_NAMES:
    torch.library.custom_op(
        f"fastbnf::{_name}", _implemented_elsewhere, mutates_args=(), schema=SCHEMAS[_name]
    )


# Fake kernels: shapes and dtypes only, for torch.compile and opcheck.


def _numel(tensors: Sequence[Tensor]) -> int:
    return sum(t.numel() for t in tensors)


def _flat_like(tensors: Sequence[Tensor], shape, dtype=None) -> Tensor:
    if len(tensors) == 0:
        return torch.empty(shape, dtype=dtype)
    return tensors[0].new_empty(shape, dtype=dtype)


def _fake_sample(means, logvars, n, out_dtype, with_kl, prior_var, prior_vars, prior_means, salt):
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


def _fake_adam_step(grad_theta, *args):
    return grad_theta.new_empty((2,), dtype=torch.int64)


_FAKES = {
    "sample": _fake_sample,
    "sample_backward": _fake_sample_backward,
    "kl": _fake_kl,
    "kl_backward": _fake_kl_backward,
    "variance": _fake_variance,
    "adam_step": _fake_adam_step,
}

# The kernel ops get the public ops' fakes, so that opcheck can test them on their own.
for _name, _fake in _FAKES.items():
    if _name in OP_NAMES:
        torch.library.register_fake(f"fastbnf::{_name}", _fake)
    torch.library.register_fake(f"fastbnf::{_name}{KERNEL_SUFFIX}", _fake, lib=LIBRARY)
