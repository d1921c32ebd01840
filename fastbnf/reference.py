r"""Pure-PyTorch twins of every op.

They are the fallback on any device without a compiled kernel and the oracle every kernel is
tested against. Each works on a whole group at once: a handful of PyTorch ops per group, not
one loop over its tensors.

The noise is drawn from a private :class:`torch.Generator` seeded by a key drawn from PyTorch's
default CPU generator, so :func:`torch.manual_seed` and :func:`torch.random.fork_rng` reproduce
samples, and the backward regenerates it from ``rng_state`` instead of keeping it. Its stream
differs from the compiled kernels' Philox stream (see ``csrc/common/philox.h``).
"""

__all__ = [
    "kl",
    "kl_backward",
    "sample",
    "sample_backward",
    "softclip",
    "softclip_grad",
    "variance",
]

import math
import torch

from collections.abc import Sequence
from torch import Tensor

SOFTCLIP_BOUND = 18.0

_MASK64 = (1 << 64) - 1
_STREAM_MIX = 0x9E3779B97F4A7C15


def softclip(x: Tensor, bound: float = SOFTCLIP_BOUND) -> Tensor:
    r"""Returns :math:`x / \sqrt{1 + (x / b)^2}`, a smooth clip of :math:`x` to :math:`(-b, b)`."""

    # In place after the first op: group-sized temporaries are fresh pages, which cost more
    # than the arithmetic. The order of the operations (and so the rounding) is unchanged.
    return (x / bound).square_().add_(1).rsqrt_().mul_(x)


def softclip_grad(x: Tensor, bound: float = SOFTCLIP_BOUND) -> Tensor:
    r"""Returns the derivative of :func:`softclip`, :math:`(1 + (x / b)^2)^{-3/2}`."""

    return (x / bound).square_().add_(1).rsqrt_().pow_(3)


def _flat(tensors: Sequence[Tensor]) -> Tensor:
    if len(tensors) == 0:
        return torch.empty(0)
    return torch.cat([t.reshape(-1) for t in tensors])


def _group_like(tensors: Sequence[Tensor]) -> tuple[torch.dtype, torch.device]:
    if len(tensors) == 0:
        return torch.get_default_dtype(), torch.device("cpu")
    return tensors[0].dtype, tensors[0].device


def _prior(
    means: Sequence[Tensor],
    prior_var: float,
    prior_vars: Sequence[float] | None,
    prior_means: Sequence[Tensor] | None,
) -> tuple[Tensor | float, Tensor | float]:
    r"""Returns the prior mean and variance, per element where they vary per tensor."""

    dtype, device = _group_like(means)

    if prior_vars is None:
        var = prior_var
    else:
        sizes = torch.tensor([m.numel() for m in means], device=device)
        var = torch.tensor(prior_vars, dtype=dtype, device=device).repeat_interleave(sizes)

    mean = 0.0 if prior_means is None else _flat(prior_means).to(dtype)

    return mean, var


def _log(x: Tensor | float) -> Tensor | float:
    return x.log() if isinstance(x, Tensor) else math.log(x)


def _key(stream: int) -> int:
    seed = int(torch.empty((), dtype=torch.int64).random_())
    seed = (seed ^ (stream * _STREAM_MIX)) & _MASK64
    return seed - (1 << 64) if seed >= 1 << 63 else seed


def _noise(rng_state: Tensor, shape: tuple[int, ...], dtype: torch.dtype, device) -> Tensor:
    seed, _ = rng_state.tolist()
    generator = torch.Generator(device).manual_seed(seed & _MASK64)
    return torch.randn(shape, generator=generator, dtype=dtype, device=device)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


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
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Samples :math:`\theta = \mu + \sigma \epsilon` for a group, and optionally its KL.

    See :mod:`fastbnf._schemas` for the contract.

    Returns:
        The flat samples, the KL (0-dim) and the ``(seed, offset)`` pair of the noise.
    """

    dtype, device = _group_like(means)
    mu, logvar = _flat(means).to(device), _flat(logvars).to(device)
    shape = (mu.numel(),) if n is None else (n, mu.numel())

    rng_state = torch.tensor([_key(stream), 0], dtype=torch.int64, device=device)
    eps = _noise(rng_state, shape, _compute_dtype(dtype), device)

    lv = softclip(logvar)
    sigma = lv.div(2).exp_()
    theta = torch.addcmul(mu, sigma, eps).to(out_dtype or dtype)

    if with_kl:
        prior_mean, var = _prior(means, prior_var, prior_vars, prior_means)
        divergence = _kl_flat(mu, lv, prior_mean, var, dtype)
    else:
        divergence = torch.zeros((), dtype=dtype, device=device)

    return theta, divergence, rng_state


def sample_backward(
    grad_theta: Tensor,
    grad_kl: Tensor,
    means: Sequence[Tensor],
    logvars: Sequence[Tensor],
    rng_state: Tensor,
    with_kl: bool = False,
    prior_var: float = 1.0,
    prior_vars: Sequence[float] | None = None,
    prior_means: Sequence[Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Returns the flat gradients of :func:`sample` with respect to the means and log-variances."""

    dtype, device = _group_like(means)
    logvar = _flat(logvars).to(device)
    grad_theta = grad_theta.to(_compute_dtype(dtype))
    eps = _noise(rng_state, tuple(grad_theta.shape), _compute_dtype(dtype), device).to(dtype)

    if grad_theta.dim() == 2:
        grad_mu = grad_theta.sum(dim=0)
        grad_sigma = eps.mul_(grad_theta).sum(dim=0)
    else:
        grad_mu, grad_sigma = grad_theta, eps.mul_(grad_theta)

    lv = softclip(logvar)
    sigma = lv.div(2).exp_()
    slope = softclip_grad(logvar)
    grad_logvar = slope.mul(0.5).mul_(sigma).mul_(grad_sigma)

    if with_kl:
        # The flat tensors above serve the KL's gradient too (as kl_backward computes it).
        mu = _flat(means).to(device)
        prior_mean, var = _prior(means, prior_var, prior_vars, prior_means)
        kl_mu, kl_logvar = _kl_grads(grad_kl.to(dtype), mu, lv, slope, prior_mean, var)
        grad_mu, grad_logvar = kl_mu.add_(grad_mu), grad_logvar.add_(kl_logvar)

    return grad_mu.to(dtype), grad_logvar.to(dtype)


def kl(
    means: Sequence[Tensor],
    logvars: Sequence[Tensor],
    prior_var: float = 1.0,
    prior_vars: Sequence[float] | None = None,
    prior_means: Sequence[Tensor] | None = None,
) -> Tensor:
    r"""Returns :math:`\mathrm{KL}(\mathcal{N}(\mu, \sigma^2) \,\|\, \mathcal{N}(m, v))` summed over a group."""

    dtype, device = _group_like(means)
    mu, logvar = _flat(means).to(device), _flat(logvars).to(device)
    prior_mean, var = _prior(means, prior_var, prior_vars, prior_means)

    return _kl_flat(mu, softclip(logvar), prior_mean, var, dtype)


def _kl_flat(mu: Tensor, lv: Tensor, prior_mean, var, dtype: torch.dtype) -> Tensor:
    r"""The KL of flat means and softclipped log-variances ``lv`` (left unchanged)."""

    # 0.5 * (exp(lv) / v + (mu - m)^2 / v + log(v) - lv - 1), in place, in that order.
    terms = lv.exp().div_(var).add_((mu - prior_mean).square_().div_(var))
    terms = terms.add_(_log(var)).sub_(lv).sub_(1).mul_(0.5)

    # Summed in fp64, as the kernels do, so that the twins agree to rounding.
    return terms.sum(dtype=torch.float64).to(dtype)


def kl_backward(
    grad_kl: Tensor,
    means: Sequence[Tensor],
    logvars: Sequence[Tensor],
    prior_var: float = 1.0,
    prior_vars: Sequence[float] | None = None,
    prior_means: Sequence[Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Returns the flat gradients of :func:`kl` with respect to the means and log-variances."""

    dtype, device = _group_like(means)
    mu, logvar = _flat(means).to(device), _flat(logvars).to(device)
    prior_mean, var = _prior(means, prior_var, prior_vars, prior_means)

    return _kl_grads(
        grad_kl.to(dtype), mu, softclip(logvar), softclip_grad(logvar), prior_mean, var
    )


def _kl_grads(g: Tensor, mu: Tensor, lv: Tensor, slope: Tensor, prior_mean, var):
    r"""The KL's gradients from flat means, softclipped log-variances ``lv`` and the softclip's
    derivative ``slope``; ``lv`` and ``slope`` are overwritten."""

    grad_mu = (mu - prior_mean).mul_(g).div_(var)
    grad_logvar = slope.mul_(g).mul_(0.5).mul_(lv.exp_().div_(var).sub_(1))

    return grad_mu, grad_logvar


def variance(logvars: Sequence[Tensor]) -> Tensor:
    r"""Returns the flat variances :math:`\exp(\mathrm{softclip}(\log \sigma^2))` of a group."""

    return softclip(_flat(logvars)).exp_()
