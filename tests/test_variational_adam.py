r"""The variational Adam step of a group (fastbnf.optim.variational_adam_step) against zuko's
loop: the same noise injected into zuko's ``reparameterize()``, its KL, ``backward()`` and
``torch.optim.Adam`` (or AdamW) on its means and log-variances, step for step."""

import pytest
import torch
import torch.nn as nn
import zuko.bayesian

from torch.func import functional_call

import fastbnf

from fastbnf import ops
from fastbnf.optim import variational_adam_step


def twins(dtype, init_logvar=-4.0):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2)).to(dtype)
    ours = fastbnf.BayesianModel(base, init_logvar=init_logvar)
    theirs = zuko.bayesian.BayesianModel(
        nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2)).to(dtype)
    )
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


@pytest.mark.parametrize(
    "dtype,tolerance",
    [(torch.float64, dict(rtol=1e-10, atol=1e-12)), (torch.float32, dict(rtol=1e-4, atol=1e-5))],
)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_steps_equal_zukos_loop_with_the_same_noise(backend, dtype, tolerance, weight_decay):
    ours, theirs = twins(dtype)
    (group,) = ours._get_groups()
    x, y = torch.randn(32, 3, dtype=dtype), torch.randn(32, 2, dtype=dtype)
    lam, prior_var, lr, betas = 1e-2, 0.5, 1e-2, (0.9, 0.99)

    # Ours: the group's moments, its first sample, then steps.
    means, logvars = group.means, group.logvars
    exp_avgs = [torch.zeros_like(p) for p in [*means, *logvars]]
    exp_avg_sqs = [torch.zeros_like(p) for p in [*means, *logvars]]
    with torch.no_grad():
        theta, _, rng_state = ops.sample(means, logvars, prior=ops.Prior(prior_var))

    # zuko's: AdamW's decoupled weight decay on the means only.
    optimizer = torch.optim.AdamW(
        [
            {"params": list(theirs.means.values()), "weight_decay": weight_decay},
            {"params": list(theirs.logvars.values()), "weight_decay": 0.0},
        ],
        lr=lr,
        betas=betas,
        foreach=False,
    )

    for step in range(1, 31):
        # The noise of this step's sample, recovered from it, for zuko's randn_like.
        with torch.no_grad():
            sigma = [fastbnf.reference.softclip(lv).div(2).exp() for lv in logvars]
            pieces = ops.unflatten(theta, means)
            noise = [(p - m) / s for p, m, s in zip(pieces, means, sigma)]

        # Ours: the data loss at the sample, its gradient, the step.
        leaves = [p.clone().requires_grad_() for p in pieces]
        params = dict(zip(group.names, leaves))
        loss = (functional_call(ours.base, params, (x,)) - y).square().mean()
        grads = torch.autograd.grad(loss, leaves)
        grad_theta = torch.cat([g.reshape(-1) for g in grads])
        theta, rng_state = variational_adam_step(
            grad_theta,
            means,
            logvars,
            exp_avgs,
            exp_avg_sqs,
            rng_state,
            step,
            lr=lr,
            betas=betas,
            weight_decay=weight_decay,
            kl_weight=lam,
            prior=ops.Prior(prior_var),
        )

        # zuko's loop with the same noise.
        draws = iter(noise)
        original = torch.randn_like
        torch.randn_like = lambda t, **kwargs: next(draws).to(t.dtype)
        try:
            optimizer.zero_grad()
            kl = theirs.kl_divergence(prior_var=prior_var)
            with theirs.reparameterize() as model:
                zuko_loss = (model(x) - y).square().mean() + lam * kl
            zuko_loss.backward()
        finally:
            torch.randn_like = original
        optimizer.step()

        torch.testing.assert_close(loss, zuko_loss - lam * kl.detach(), **tolerance)
        for key, mean, logvar in zip(group.keys, means, logvars):
            torch.testing.assert_close(mean, theirs.means[key], **tolerance, msg=key)
            torch.testing.assert_close(logvar, theirs.logvars[key], **tolerance, msg=key)


def test_the_next_sample_comes_from_the_updated_posterior(backend):
    ours, _ = twins(torch.float64, init_logvar=-2.0)
    (group,) = ours._get_groups()
    means, logvars = group.means, group.logvars
    moments = [torch.zeros_like(p) for p in [*means, *logvars]]
    with torch.no_grad():
        theta, _, rng_state = ops.sample(means, logvars)
    grad_theta = torch.randn_like(theta)

    next_theta, next_state = variational_adam_step(
        grad_theta, means, logvars, moments, [m.clone() for m in moments], rng_state, 1, lr=0.1
    )

    # A fresh key, and a sample of the updated posterior (its noise standard normal).
    assert not torch.equal(next_state, rng_state)
    sigma = torch.cat([fastbnf.reference.softclip(lv).div(2).exp().reshape(-1) for lv in logvars])
    mu = torch.cat([m.reshape(-1) for m in means])
    eps = (next_theta - mu) / sigma
    assert abs(eps.mean().item()) < 0.2 and 0.8 < eps.std().item() < 1.2


def test_bad_arguments_change_nothing(backend):
    ours, _ = twins(torch.float64)
    (group,) = ours._get_groups()
    means, logvars = group.means, group.logvars
    moments = [torch.zeros_like(p) for p in [*means, *logvars]]
    before = [p.detach().clone() for p in [*means, *logvars]]
    with torch.no_grad():
        theta, _, rng_state = ops.sample(means, logvars)

    with pytest.raises(ValueError, match="step must be an integer >= 1"):
        variational_adam_step(theta, means, logvars, moments, moments, rng_state, 0)
    with pytest.raises(ValueError, match="twice as many moments"):
        variational_adam_step(theta, means, logvars, moments[:2], moments, rng_state, 1)
    for p, b in zip([*means, *logvars], before):
        assert torch.equal(p, b)
