r"""Pure-PyTorch twins of every op.

They are the fallback on any device without a compiled kernel and the oracle every kernel is
tested against. They check the same input contract as the kernels (:mod:`fastbnf._contract`)
and perform the per-element maths of ``csrc/common/posterior_math.h`` in the same order, one
rounding per operation, in float32 for float16, bfloat16 and float32 groups and in float64 for
float64 ones: given the same noise, the CPU kernels agree with them bit for bit in float64.

Each twin works on a group in chunks of whole tensors of up to 2M elements: a handful of
PyTorch ops per chunk, not one loop over the tensors, and temporaries of a few MB, which the
allocator reuses, where group-sized ones would be fresh mappings on every call (a page fault per
page and its zeroing: as slow as the work itself at 25M parameters).

The noise is a stream indexed by flat position, as the kernels' is: blocks of 16K normals, each
from a private :class:`torch.Generator` seeded with a key drawn from PyTorch's default CPU
generator and the block's index (:class:`_Stream`). So :func:`torch.manual_seed` and
:func:`torch.random.fork_rng` reproduce samples, the backward regenerates the noise from
``rng_state`` instead of keeping it, and a shard of a group draws its slice of the whole group's
noise (``adam_step``'s ``noise_offsets``). Its random numbers differ from the compiled kernels'
Philox ones (see ``csrc/common/philox.h``).
"""

__all__ = [
    "adam_step",
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

from ._contract import (
    Group,
    check_adam_step,
    check_grad_kl,
    check_grad_theta,
    check_out_dtype,
    check_rng_state,
    check_samples,
    check_step_tensor,
    compute_dtype,
    make_group,
)

# The constants of csrc/common/posterior_math.h and philox.h (a test checks that they agree).
SOFTCLIP_BOUND = 18.0
SALT_MIX = 0x9E3779B97F4A7C15

_MASK64 = (1 << 64) - 1


def _softclip_scale(x: Tensor) -> Tensor:
    r"""Returns :math:`q = (1 + (x / b)^2)^{-1/2}`: softclip is :math:`x q`, its slope
    :math:`q^3`."""

    # In place after the first op: group-sized temporaries are fresh pages, which cost more
    # than the arithmetic. The order of the operations (and so the rounding) is the header's.
    # The bound is a tensor on x's device: PyTorch's CUDA division by a Python number multiplies
    # by its rounded reciprocal, one ulp away from the header's division.
    bound = torch.full((), SOFTCLIP_BOUND, dtype=x.dtype, device=x.device)
    return (x / bound).square_().add_(1).rsqrt_()


def softclip(x: Tensor) -> Tensor:
    r"""Returns :math:`x / \sqrt{1 + (x / 18)^2}`, a smooth clip of :math:`x` to
    :math:`(-18, 18)`."""

    return _softclip_scale(x).mul_(x)


def softclip_grad(x: Tensor) -> Tensor:
    r"""Returns the derivative of :func:`softclip`, :math:`(1 + (x / 18)^2)^{-3/2}`."""

    return _softclip_scale(x).pow_(3)


# Elements per chunk (8 MB in fp32); a larger tensor makes a chunk of its own.
_CHUNK = 1 << 21


def _flat(tensors: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    r"""The tensors flat and end to end in ``dtype``, a new tensor (the twins write to it)."""

    if len(tensors) == 1:
        return tensors[0].reshape(-1).to(dtype, copy=True)
    return torch.cat([t.reshape(-1) for t in tensors]).to(dtype)


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


class _ChunkPrior:
    r"""The prior of a chunk: per element (or scalar) ``1 / v``, ``log(v) - 1`` and mean,
    rounded once from float64 to the arithmetic's dtype, as the kernels round them."""

    def __init__(
        self,
        group: Group,
        tensors: slice,
        prior_var: float,
        prior_vars: Sequence[float] | None,
        dtype: torch.dtype,
    ) -> None:
        if prior_vars is None:
            self.inv_var, self.log_var_m1 = 1.0 / prior_var, math.log(prior_var) - 1.0
        else:
            sizes = torch.tensor([x.numel() for x in group.logvars[tensors]], device=group.device)
            variances = prior_vars[tensors]

            def per_element(values):
                return torch.tensor(values, dtype=dtype, device=group.device).repeat_interleave(
                    sizes
                )

            self.inv_var = per_element([1.0 / v for v in variances])
            self.log_var_m1 = per_element([math.log(v) - 1.0 for v in variances])

        self.mean = None if group.prior_means is None else _flat(group.prior_means[tensors], dtype)

    def offset(self, mu: Tensor) -> Tensor:
        r"""``mu - m``, a new tensor."""

        return mu.clone() if self.mean is None else mu - self.mean


def _key(salt: int) -> int:
    seed = int(torch.empty((), dtype=torch.int64).random_())
    seed = (seed ^ (salt * SALT_MIX)) & _MASK64
    return seed - (1 << 64) if seed >= 1 << 63 else seed


# Elements per block of the noise stream: the unit its generator is seeded for.
_NOISE_BLOCK = 1 << 14


def _mix(*words: int) -> int:
    r"""A 64-bit hash of integers (splitmix64's finalizer, chained): the seed of a block."""

    z = 0
    for word in words:
        z = (z ^ (word & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & _MASK64
        z ^= z >> 31
    return z


class _Stream:
    r"""The noise of a key by flat index: element ``j`` (``j = k N + i`` for element ``i`` of
    sample ``k`` of a group of ``N`` elements) is element ``j mod B`` of block ``j // B``, a
    ``randn(B)`` from a private :class:`torch.Generator` seeded with the key and the block.

    Any part of the stream is drawn without the rest: the twin of the kernels' counter map, so
    that a rank stepping its shards of a group (``noise_offsets``) draws its slice of the whole
    group's noise, and the noise does not depend on how a group is cut into chunks.
    """

    def __init__(self, rng_state: Tensor, numel: int, device: torch.device) -> None:
        self.seed, self.offset = (x & _MASK64 for x in rng_state.tolist())
        self.numel = numel
        self.generator = torch.Generator(device)
        # The block last drawn for a part of it, reused: fresh pages cost as much as the draw.
        self.scratch: Tensor | None = None
        self.drawn: int | None = None

    def _draw(self, b: int, out: Tensor) -> None:
        self.generator.manual_seed(_mix(self.seed, self.offset, b))
        torch.randn(_NOISE_BLOCK, generator=self.generator, out=out)

    def fill(self, out: Tensor, start: int) -> None:
        r"""Writes the stream's elements ``start .. start + n - 1`` into ``out``, a contiguous
        1-d tensor of ``n`` elements: whole blocks in place, parts of blocks from a copy."""

        done, count = 0, out.numel()
        while done < count:
            b, e = divmod(start + done, _NOISE_BLOCK)
            take = min(count - done, _NOISE_BLOCK - e)
            if take == _NOISE_BLOCK:
                self._draw(b, out[done : done + take])
            else:
                if self.scratch is None or self.scratch.dtype != out.dtype:
                    self.scratch = out.new_empty(_NOISE_BLOCK)
                    self.drawn = None
                if self.drawn != b:
                    self._draw(b, self.scratch)
                    self.drawn = b
                out[done : done + take].copy_(self.scratch[e : e + take])
            done += take


def _noise(
    stream: _Stream, ranges: list[tuple[int, int]], shape, dtype: torch.dtype, device
) -> Tensor:
    r"""The noise of a chunk, ``shape`` ``(..., M)``: of sample ``k`` (the rows of a 2-d
    shape), the stream's elements ``k N + start .. k N + start + count - 1`` for every
    ``(start, count)`` of ``ranges`` in turn, ``M`` in all (the tests replace it with the
    kernels' noise to compare the maths)."""

    out = torch.empty(shape, dtype=dtype, device=device)
    if out.numel() == 0:
        return out
    if ranges == [(0, stream.numel)]:  # the whole group: its samples follow each other
        stream.fill(out.view(-1), 0)
        return out
    rows = out.view(-1, shape[-1])
    for k in range(rows.shape[0]):
        position = 0
        for start, count in ranges:
            stream.fill(rows[k, position : position + count], k * stream.numel + start)
            position += count
    return out


def _ranges(group: Group, tensors: slice) -> list[tuple[int, int]]:
    r"""Where the tensors of a chunk sit in the noise stream, as ``(start, count)`` runs (one
    for a chunk whose tensors follow each other there, as they do but for shards)."""

    ranges: list[tuple[int, int]] = []
    for begin, x in zip(group.noise_begins[tensors], group.logvars[tensors]):
        count = x.numel()
        if ranges and ranges[-1][0] + ranges[-1][1] == begin:
            ranges[-1] = (ranges[-1][0], ranges[-1][1] + count)
        elif count > 0:
            ranges.append((begin, count))
    return ranges


def _kl_sum(mu: Tensor, lc: Tensor, prior: _ChunkPrior) -> Tensor:
    r"""The KL of flat means and softclipped log-variances ``lc`` (left unchanged), in fp64."""

    d = prior.offset(mu)
    terms = lc.exp().add_(d.square_()).mul_(prior.inv_var).add_(prior.log_var_m1)
    terms = terms.sub_(lc).mul_(0.5)
    return terms.sum(dtype=torch.float64)


def sample(
    means: Sequence[Tensor],
    logvars: Sequence[Tensor],
    n: int | None = None,
    out_dtype: torch.dtype | None = None,
    with_kl: bool = False,
    prior_var: float = 1.0,
    prior_vars: Sequence[float] | None = None,
    prior_means: Sequence[Tensor] | None = None,
    salt: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Samples :math:`\theta = \mu + \sigma \epsilon` for a group, and optionally its KL.

    See :mod:`fastbnf.ops.library` for the contract.

    Returns:
        The flat samples, the KL (0-dim) and the ``(seed, offset)`` pair of the noise.
    """

    op = "fastbnf::sample"
    group = make_group(op, means, logvars, (prior_var, prior_vars, prior_means))
    samples = check_samples(op, n)
    theta_dtype = check_out_dtype(op, out_dtype, group)
    shape = (group.numel,) if n is None else (samples, group.numel)
    return _draw(group, shape, theta_dtype, with_kl, prior_var, prior_vars, salt)


def _draw(
    group: Group,
    shape: tuple[int, ...],
    theta_dtype: torch.dtype,
    with_kl: bool,
    prior_var: float,
    prior_vars: Sequence[float] | None,
    salt: int,
) -> tuple[Tensor, Tensor, Tensor]:
    r""":func:`sample` of a checked group, its noise where the group places it."""

    dtype, device = compute_dtype(group.dtype), group.device
    rng_state = torch.tensor([_key(salt), 0], dtype=torch.int64, device=device)
    stream = _Stream(rng_state, group.numel, device)
    theta = torch.empty(shape, dtype=theta_dtype, device=device)
    total = torch.zeros((), dtype=torch.float64, device=device)

    for tensors, elements in _chunks(group.logvars):
        mu = _flat(group.means[tensors], dtype)
        lc = softclip(_flat(group.logvars[tensors], dtype))
        eps = _noise(stream, _ranges(group, tensors), (*shape[:-1], mu.numel()), dtype, device)
        theta[..., elements] = eps.mul_(lc.mul(0.5).exp_()).add_(mu)
        if with_kl:
            prior = _ChunkPrior(group, tensors, prior_var, prior_vars, dtype)
            total += _kl_sum(mu, lc, prior)

    return theta, total.to(group.dtype), rng_state


def _sums(g: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
    r"""``G = sum_k g_k`` and ``E = sum_k g_k eps_k`` over the samples, in order."""

    if g.dim() == 1:
        return g, eps.mul_(g)
    g_sum, ge_sum = g[0].clone(), eps[0] * g[0]
    for k in range(1, g.shape[0]):
        g_sum.add_(g[k])
        ge_sum.add_(eps[k].mul_(g[k]))
    return g_sum, ge_sum


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
    r"""Returns the flat gradients of :func:`sample` with respect to the means and
    log-variances."""

    op = "fastbnf::sample_backward"
    group = make_group(op, means, logvars, (prior_var, prior_vars, prior_means))
    grad_theta = check_grad_theta(op, grad_theta, group)
    check_rng_state(op, rng_state, group)
    return _backward(
        group, grad_theta, grad_kl if with_kl else None, rng_state, prior_var, prior_vars, op
    )


def _backward(
    group: Group,
    grad_theta: Tensor | None,
    grad_kl: Tensor | None,
    rng_state: Tensor | None,
    prior_var: float,
    prior_vars: Sequence[float] | None,
    op: str,
) -> tuple[Tensor, Tensor]:
    r"""The gradients of the samples (with ``grad_theta``) and of the KL (with ``grad_kl``)."""

    dtype, device = compute_dtype(group.dtype), group.device
    if grad_kl is not None:
        check_grad_kl(op, grad_kl, group)
        grad_kl = grad_kl.reshape(()).to(dtype)
    stream = None if grad_theta is None else _Stream(rng_state, group.numel, device)
    grad_mu = torch.empty(group.numel, dtype=group.dtype, device=device)
    grad_logvar = torch.empty_like(grad_mu)

    for tensors, elements in _chunks(group.logvars):
        logvar = _flat(group.logvars[tensors], dtype)
        q = _softclip_scale(logvar)
        lc, slope = q * logvar, q.pow(3)

        g_sum = part = None
        if grad_theta is not None:
            g = grad_theta[..., elements]
            eps = _noise(stream, _ranges(group, tensors), g.shape, dtype, device)
            g_sum, ge_sum = _sums(g, eps)
            part = lc.mul(0.5).exp_().mul_(0.5).mul_(ge_sum)

        if grad_kl is not None:
            mu = _flat(group.means[tensors], dtype)
            prior = _ChunkPrior(group, tensors, prior_var, prior_vars, dtype)
            kl_mu = prior.offset(mu).mul_(prior.inv_var).mul_(grad_kl)
            g_sum = kl_mu if g_sum is None else kl_mu.add_(g_sum)
            kl_part = lc.exp().mul_(prior.inv_var).sub_(1).mul_(0.5).mul_(grad_kl)
            part = kl_part if part is None else part.add_(kl_part)

        grad_mu[elements] = g_sum
        grad_logvar[elements] = part.mul_(slope)

    return grad_mu, grad_logvar


def kl(
    means: Sequence[Tensor],
    logvars: Sequence[Tensor],
    prior_var: float = 1.0,
    prior_vars: Sequence[float] | None = None,
    prior_means: Sequence[Tensor] | None = None,
) -> Tensor:
    r"""Returns :math:`\mathrm{KL}(\mathcal{N}(\mu, \sigma^2) \,\|\, \mathcal{N}(m, v))`
    summed over a group."""

    group = make_group("fastbnf::kl", means, logvars, (prior_var, prior_vars, prior_means))
    dtype = compute_dtype(group.dtype)
    total = torch.zeros((), dtype=torch.float64, device=group.device)

    for tensors, _ in _chunks(group.logvars):
        mu = _flat(group.means[tensors], dtype)
        lc = softclip(_flat(group.logvars[tensors], dtype))
        total += _kl_sum(mu, lc, _ChunkPrior(group, tensors, prior_var, prior_vars, dtype))

    return total.to(group.dtype)


def kl_backward(
    grad_kl: Tensor,
    means: Sequence[Tensor],
    logvars: Sequence[Tensor],
    prior_var: float = 1.0,
    prior_vars: Sequence[float] | None = None,
    prior_means: Sequence[Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Returns the flat gradients of :func:`kl` with respect to the means and log-variances."""

    op = "fastbnf::kl_backward"
    group = make_group(op, means, logvars, (prior_var, prior_vars, prior_means))
    return _backward(group, None, grad_kl, None, prior_var, prior_vars, op)


def variance(logvars: Sequence[Tensor]) -> Tensor:
    r"""Returns the flat variances :math:`\exp(\mathrm{softclip}(\log \sigma^2))` of a group."""

    group = make_group("fastbnf::variance", None, logvars)
    dtype = compute_dtype(group.dtype)
    out = torch.empty(group.numel, dtype=group.dtype, device=group.device)
    for tensors, elements in _chunks(group.logvars):
        out[elements] = softclip(_flat(group.logvars[tensors], dtype)).exp_()
    return out


@torch.no_grad()
def adam_step(
    grad_theta: Tensor,
    means: Sequence[Tensor],
    logvars: Sequence[Tensor],
    exp_avgs: Tensor,
    exp_avg_sqs: Tensor,
    theta: Tensor,
    rng_state: Tensor,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    kl_weight: float,
    prior_var: float = 1.0,
    prior_vars: Sequence[float] | None = None,
    prior_means: Sequence[Tensor] | None = None,
    salt: int = 0,
    noise_offsets: Sequence[int] | None = None,
    step_tensor: Tensor | None = None,
) -> Tensor:
    r"""Takes one variational Adam step of a group in place and draws its next sample into
    ``theta``: :func:`sample_backward`'s gradients with ``grad_kl = kl_weight``, then
    :func:`adam_posterior_update`, then :func:`sample`, the noise of both where
    ``noise_offsets`` place the tensors, and the count ``step_tensor``'s where it is given.

    See :mod:`fastbnf.ops.library` for the contract.

    Returns:
        The ``(seed, offset)`` pair of the next sample's noise.
    """

    op = "fastbnf::adam_step"
    prior = (prior_var, prior_vars, prior_means)
    group = make_group(op, means, logvars, prior, noise_offsets)
    grad = check_adam_step(
        op, group, means, logvars, grad_theta, exp_avgs, exp_avg_sqs, theta, step
    )
    check_rng_state(op, rng_state, group)
    if step_tensor is not None:
        check_step_tensor(op, step_tensor, group)
        step = int(step_tensor)  # read on the host: the twin is not capturable
    # AdamW's maths is the optimizer's; a function-level import, since fastbnf.optim imports
    # the model, which imports the ops, which import this module.
    from .optim.adamw import adam_posterior_update

    grad_kl = torch.full((), kl_weight, dtype=group.dtype, device=group.device)
    grad = grad.to(compute_dtype(group.dtype))
    grad_mu, grad_logvar = _backward(group, grad, grad_kl, rng_state, prior_var, prior_vars, op)
    adam_posterior_update(
        means, logvars, grad_mu, grad_logvar, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2,
        eps, weight_decay,
    )  # fmt: skip
    # The updated posterior, read where the step wrote it (the group's tensors are the
    # caller's: check_adam_step requires them contiguous and of the group's dtype).
    sample_theta, _, next_state = _draw(
        group, (group.numel,), theta.dtype, False, prior_var, prior_vars, salt
    )
    theta.copy_(sample_theta)
    return next_state
