r"""Pure-PyTorch twins of every op.

They are the fallback on any device without a compiled kernel and the oracle every kernel is
tested against. Each works on a group in chunks of whole tensors of up to 2M elements: a
handful of PyTorch ops per chunk, not one loop over the tensors, and temporaries of a few MB,
which the allocator reuses, where group-sized ones would be fresh mappings on every call (a page
fault per page and its zeroing: as slow as the work itself at 25M parameters).

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


# Elements per chunk (8 MB in fp32); a larger tensor makes a chunk of its own.
_CHUNK = 1 << 21


def _flat(tensors: Sequence[Tensor]) -> Tensor:
    r"""The tensors flat and end to end (a view for one tensor: the twins never write to it)."""

    if len(tensors) == 0:
        return torch.empty(0)
    if len(tensors) == 1:
        return tensors[0].reshape(-1)
    return torch.cat([t.reshape(-1) for t in tensors])


def _chunks(tensors: Sequence[Tensor]) -> list[tuple[slice, slice]]:
    r"""Consecutive runs of whole tensors of at most :data:`_CHUNK` elements (a larger tensor
    alone): for each, the slice of the tensors and the slice of the flat index space."""

    chunks, t0, i0, i = [], 0, 0, 0
    for t, x in enumerate(tensors):
        if t > t0 and i + x.numel() - i0 > _CHUNK:
            chunks.append((slice(t0, t), slice(i0, i)))
            t0, i0 = t, i
        i += x.numel()
    chunks.append((slice(t0, len(tensors)), slice(i0, i)))
    return chunks


def _part(values: Sequence | None, tensors: slice) -> Sequence | None:
    return None if values is None else values[tensors]


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


def _generator(rng_state: Tensor, device) -> torch.Generator:
    r"""The private generator of the noise; each chunk draws from it in turn, forward and
    backward alike."""

    seed, _ = rng_state.tolist()
    return torch.Generator(device).manual_seed(seed & _MASK64)


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
    numel = sum(m.numel() for m in means)
    shape = (numel,) if n is None else (n, numel)

    rng_state = torch.tensor([_key(stream), 0], dtype=torch.int64, device=device)
    generator = _generator(rng_state, device)
    theta = torch.empty(shape, dtype=out_dtype or dtype, device=device)
    total = torch.zeros((), dtype=torch.float64, device=device)

    for tensors, elements in _chunks(means):
        mu = _flat(means[tensors]).to(device)
        lv = softclip(_flat(logvars[tensors]).to(device))
        eps = torch.randn(
            (*shape[:-1], mu.numel()), generator=generator, dtype=_compute_dtype(dtype),
            device=device,
        )
        theta[..., elements] = torch.addcmul(mu, lv.div(2).exp_(), eps)
        if with_kl:
            prior = _prior(
                means[tensors], prior_var, _part(prior_vars, tensors), _part(prior_means, tensors)
            )
            total += _kl_sum(mu, lv, *prior)

    return theta, total.to(dtype), rng_state


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
    grad_theta = grad_theta.to(_compute_dtype(dtype))
    generator = _generator(rng_state, device)
    grad_mu = torch.empty(grad_theta.shape[-1], dtype=dtype, device=device)
    grad_logvar = torch.empty_like(grad_mu)

    for tensors, elements in _chunks(means):
        g = grad_theta[..., elements]
        eps = torch.randn(g.shape, generator=generator, dtype=g.dtype, device=device).to(dtype)
        if g.dim() == 2:
            g_mu, g_sigma = g.sum(dim=0), eps.mul_(g).sum(dim=0)
        else:
            g_mu, g_sigma = g, eps.mul_(g)

        logvar = _flat(logvars[tensors]).to(device)
        lv, slope = softclip(logvar), softclip_grad(logvar)
        g_logvar = slope.mul(0.5).mul_(lv.div(2).exp_()).mul_(g_sigma)

        if with_kl:
            mu = _flat(means[tensors]).to(device)
            prior = _prior(
                means[tensors], prior_var, _part(prior_vars, tensors), _part(prior_means, tensors)
            )
            kl_mu, kl_logvar = _kl_grads(grad_kl.to(dtype), mu, lv, slope, *prior)
            g_mu, g_logvar = kl_mu.add_(g_mu), g_logvar.add_(kl_logvar)

        grad_mu[elements] = g_mu
        grad_logvar[elements] = g_logvar

    return grad_mu, grad_logvar


def kl(
    means: Sequence[Tensor],
    logvars: Sequence[Tensor],
    prior_var: float = 1.0,
    prior_vars: Sequence[float] | None = None,
    prior_means: Sequence[Tensor] | None = None,
) -> Tensor:
    r"""Returns :math:`\mathrm{KL}(\mathcal{N}(\mu, \sigma^2) \,\|\, \mathcal{N}(m, v))` summed over a group."""

    dtype, device = _group_like(means)
    total = torch.zeros((), dtype=torch.float64, device=device)

    for tensors, _ in _chunks(means):
        mu = _flat(means[tensors]).to(device)
        lv = softclip(_flat(logvars[tensors]).to(device))
        prior = _prior(
            means[tensors], prior_var, _part(prior_vars, tensors), _part(prior_means, tensors)
        )
        total += _kl_sum(mu, lv, *prior)

    return total.to(dtype)


def _kl_sum(mu: Tensor, lv: Tensor, prior_mean, var) -> Tensor:
    r"""The KL of flat means and softclipped log-variances ``lv`` (left unchanged), in fp64."""

    # 0.5 * (exp(lv) / v + (mu - m)^2 / v + log(v) - lv - 1), in place, in that order.
    terms = lv.exp().div_(var).add_((mu - prior_mean).square_().div_(var))
    terms = terms.add_(_log(var)).sub_(lv).sub_(1).mul_(0.5)

    # Summed in fp64, as the kernels do, so that the twins agree to rounding.
    return terms.sum(dtype=torch.float64)


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
    numel = sum(m.numel() for m in means)
    grad_mu = torch.empty(numel, dtype=dtype, device=device)
    grad_logvar = torch.empty_like(grad_mu)

    for tensors, elements in _chunks(means):
        mu = _flat(means[tensors]).to(device)
        logvar = _flat(logvars[tensors]).to(device)
        prior = _prior(
            means[tensors], prior_var, _part(prior_vars, tensors), _part(prior_means, tensors)
        )
        grad_mu[elements], grad_logvar[elements] = _kl_grads(
            grad_kl.to(dtype), mu, softclip(logvar), softclip_grad(logvar), *prior
        )

    return grad_mu, grad_logvar


def _kl_grads(g: Tensor, mu: Tensor, lv: Tensor, slope: Tensor, prior_mean, var):
    r"""The KL's gradients from flat means, softclipped log-variances ``lv`` and the softclip's
    derivative ``slope``; ``lv`` and ``slope`` are overwritten."""

    grad_mu = (mu - prior_mean).mul_(g).div_(var)
    grad_logvar = slope.mul_(g).mul_(0.5).mul_(lv.exp_().div_(var).sub_(1))

    return grad_mu, grad_logvar


def variance(logvars: Sequence[Tensor]) -> Tensor:
    r"""Returns the flat variances :math:`\exp(\mathrm{softclip}(\log \sigma^2))` of a group."""

    dtype, device = _group_like(logvars)
    out = torch.empty(sum(v.numel() for v in logvars), dtype=dtype, device=device)
    for tensors, elements in _chunks(logvars):
        out[elements] = softclip(_flat(logvars[tensors]).to(device)).exp_()
    return out
