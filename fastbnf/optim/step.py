r"""One variational Adam step of a group of parameters."""

from __future__ import annotations

import torch

from collections.abc import Callable, Sequence
from torch import Tensor

from ..ops.dispatch import device_of, run
from ..ops.prior import STANDARD_NORMAL, Prior
from .adamw import adam_posterior_update


@torch.no_grad()
def variational_adam_step(
    grad_theta: Tensor,
    means: Sequence[Tensor],
    logvars: Sequence[Tensor],
    exp_avgs: Tensor,
    exp_avg_sqs: Tensor,
    theta: Tensor,
    rng_state: Tensor,
    step: int,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    kl_weight: float = 1.0,
    prior: Prior = STANDARD_NORMAL,
    salt: int = 0,
    average: Callable[[Tensor], None] | None = None,
    noise_offsets: Sequence[int] | None = None,
    step_tensor: Tensor | None = None,
) -> Tensor:
    r"""Takes one variational Adam step of a group and draws its next sample into ``theta``.

    With :math:`\theta_t = \mu + \sigma \epsilon_t` the current sample (drawn from ``rng_state``)
    and :math:`g` the gradient of the data loss with respect to it, the gradients of
    :math:`\mathcal{L} = \ell(\theta_t) + \lambda \, \mathrm{KL}` are those of the seed's loop:
    :math:`g + \lambda \, \partial_\mu \mathrm{KL}` for the means and
    :math:`g \, \epsilon_t \, \partial_{\log \sigma^2} \sigma + \lambda \,
    \partial_{\log \sigma^2} \mathrm{KL}` for the log-variances, regenerated from the key rather
    than kept. Adam (AdamW's decoupled weight decay, on the means only) then updates the means,
    the log-variances and their moments in place, and the next sample is drawn from the
    updated posterior.

    Without ``average`` this is one call of the fused op ``adam_step`` (one pass over memory
    with the compiled kernels). With it, the gradients are formed first, averaged, and the
    update and the next sample follow.

    Arguments:
        grad_theta: The flat gradient of the data loss with respect to the group's sample.
        means: The group's posterior means, updated in place.
        logvars: Their log-variances, updated in place.
        exp_avgs: Adam's flat first moments, ``(2 N,)``: of the means, then of the
            log-variances.
        exp_avg_sqs: Adam's flat second moments, alike.
        theta: The flat sample, ``(N,)``, overwritten with the next one.
        rng_state: The ``(seed, offset)`` pair the current sample was drawn from.
        step: Adam's step count, this step included (1 for the first).
        lr: The learning rate.
        betas: Adam's coefficients of the running averages.
        eps: Adam's term added to the denominator.
        weight_decay: The decoupled weight decay of the means (AdamW's).
        kl_weight: The weight :math:`\lambda` of the KL divergence in the loss.
        prior: The prior of the KL.
        salt: An integer folded into the noise's key (the data-parallel rank).
        average: A function that averages, in place, the group's flat gradient (of the means,
            then of the log-variances) over data-parallel ranks before the update.
        noise_offsets: Per tensor, the index of its first element in the noise stream: for
            shards of a group (a rank's rows of each tensor), their places in the whole group,
            so that the rank draws its slice of the whole group's noise. Not with ``average``.
        step_tensor: The step count on the group's device, a one-element int64 tensor, read
            there in place of ``step`` (the capturable step of a CUDA graph: each replay reads
            the count it holds then). Not with ``average``.

    Returns:
        The ``(seed, offset)`` pair the next sample was drawn from.
    """

    if not isinstance(step, int) or isinstance(step, bool) or step < 1:
        raise ValueError(f"variational_adam_step: step must be an integer >= 1, got {step!r}.")

    device = device_of(means)
    beta1, beta2 = betas
    if average is None:
        hyper = (step, lr, beta1, beta2, eps, weight_decay, kl_weight)
        args = (grad_theta, means, logvars, exp_avgs, exp_avg_sqs, theta, rng_state)
        return run("adam_step", device, *args, *hyper, *prior, salt, noise_offsets, step_tensor)
    if noise_offsets is not None or step_tensor is not None:
        raise ValueError(
            "variational_adam_step: noise_offsets (shards) and step_tensor (capturable) exclude "
            "average (each rank's own noise, averaged on the host's count)."
        )

    # A fill, not a copy from the host: no transfer on a GPU.
    grad_kl = torch.full((), kl_weight, dtype=means[0].dtype, device=device)
    grad_mu, grad_logvar = run(
        "sample_backward", device, grad_theta, grad_kl, means, logvars, rng_state, True, *prior
    )
    # Each rank's reparameterization gradient, with its own noise, then their mean.
    flat = torch.cat([grad_mu, grad_logvar])
    average(flat)
    grad_mu, grad_logvar = flat.split([grad_mu.numel(), grad_logvar.numel()])
    adam_posterior_update(
        means, logvars, grad_mu, grad_logvar, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2,
        eps, weight_decay,
    )  # fmt: skip
    options = (None, theta.dtype, False, *prior, salt)  # one sample, no KL
    sample, _, next_state = run("sample", device, means, logvars, *options)
    theta.copy_(sample)
    return next_state
