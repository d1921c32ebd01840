r"""Priors: per-key variances and the "init" mean, against the closed form written out here."""

import math
import pytest
import torch
import torch.nn as nn

import fastbnf


def softclip(x, bound=18.0):
    return x / (1 + (x / bound) ** 2).sqrt()


def closed_form(means, logvars, inits, prior_var, prior_mean):
    r"""KL(N(mu, sigma^2) || N(m, v)) summed, from the textbook formula, in fp64."""

    total = 0.0
    for key in means:
        mu, logvar = means[key].double(), logvars[key].double()
        v = prior_var.get(key, 1.0) if isinstance(prior_var, dict) else prior_var
        m = inits[key].double() if prior_mean == "init" else 0.0
        lv = softclip(logvar)
        total = total + 0.5 * (lv.exp() / v + (mu - m).square() / v + math.log(v) - lv - 1).sum()
    return total


def trained_model(steps=5):
    r"""A model whose means moved away from the base weights, and a copy of those weights."""

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    bm = fastbnf.BayesianModel(net, init_logvar=-3.0)
    inits = {k: bm.base.get_parameter(k.replace("-", ".")).detach().clone() for k in bm.means}

    optimizer = torch.optim.SGD(bm.parameters(), lr=0.1)
    for _ in range(steps):
        x = torch.randn(16, 3)
        with bm.reparameterize() as m:
            loss = (m(x) - x[:, :2].sin()).square().mean() + 1e-3 * bm.kl_divergence()
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return bm, inits


PRIORS = [
    (1.0, 0.0),
    (0.3, 0.0),
    (2.5, "init"),
    ({"0-weight": 0.1, "2-bias": 4.0}, 0.0),
    ({"0-weight": 0.1, "2-bias": 4.0}, "init"),
]


@pytest.mark.parametrize("prior_var, prior_mean", PRIORS)
def test_kl_matches_closed_form(backend, prior_var, prior_mean):
    bm, inits = trained_model()

    # The means did move, so "init" is not the same prior as the current means.
    assert any(not torch.allclose(bm.means[k], inits[k]) for k in bm.means)
    # The base weights (the "init" prior mean) were never trained.
    for k in bm.means:
        assert torch.equal(bm.base.get_parameter(k.replace("-", ".")), inits[k])

    expected = closed_form(bm.means, bm.logvars, inits, prior_var, prior_mean)
    kl = bm.kl_divergence(prior_var=prior_var, prior_mean=prior_mean)
    torch.testing.assert_close(kl.double(), expected, rtol=1e-5, atol=1e-5)

    # The fused path gives the same value, with and without the local trick.
    for local_trick in (False, True):
        with bm.reparameterize(
            local_trick=local_trick, return_kl=True, prior_var=prior_var, prior_mean=prior_mean
        ) as (_, fused):
            torch.testing.assert_close(fused.double(), expected, rtol=1e-5, atol=1e-5)


def test_missing_dict_keys_default_to_one(backend):
    bm, _ = trained_model(steps=1)
    keys = list(bm.means)

    partial = bm.kl_divergence(prior_var={keys[0]: 0.5})
    explicit = bm.kl_divergence(prior_var={k: (0.5 if k == keys[0] else 1.0) for k in keys})
    torch.testing.assert_close(partial, explicit)
    torch.testing.assert_close(bm.kl_divergence(prior_var={}), bm.kl_divergence())


@pytest.mark.parametrize("prior_var, prior_mean", PRIORS)
def test_gradients_match_autograd_of_closed_form(backend, prior_var, prior_mean):
    bm, inits = trained_model(steps=2)

    bm.kl_divergence(prior_var=prior_var, prior_mean=prior_mean).backward()
    ours = {k: (bm.means[k].grad.clone(), bm.logvars[k].grad.clone()) for k in bm.means}
    bm.zero_grad()

    with bm.reparameterize(return_kl=True, prior_var=prior_var, prior_mean=prior_mean) as (_, kl):
        kl.backward()
    fused = {k: (bm.means[k].grad.clone(), bm.logvars[k].grad.clone()) for k in bm.means}

    means = {k: v.detach().double().requires_grad_() for k, v in bm.means.items()}
    logvars = {k: v.detach().double().requires_grad_() for k, v in bm.logvars.items()}
    closed_form(means, logvars, inits, prior_var, prior_mean).backward()

    for k in bm.means:
        for got in (ours[k], fused[k]):
            torch.testing.assert_close(got[0].double(), means[k].grad, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got[1].double(), logvars[k].grad, rtol=1e-5, atol=1e-6)


BAD = [
    ({"prior_var": -1.0}, "prior_var"),
    ({"prior_var": 0.0}, "prior_var"),
    ({"prior_var": float("nan")}, "prior_var"),
    ({"prior_var": float("inf")}, "prior_var"),
    ({"prior_var": {"0-weight": -2.0}}, "0-weight"),
    ({"prior_var": {"0-weight": float("nan")}}, "0-weight"),
    ({"prior_var": {"nope": 1.0}}, "nope"),
    ({"prior_var": {"0.weight": 1.0}}, "0.weight"),
    ({"prior_mean": 0.5}, "prior_mean"),
    ({"prior_mean": "zero"}, "prior_mean"),
    ({"prior_mean": True}, "prior_mean"),
]


@pytest.mark.parametrize("kwargs, name", BAD)
def test_bad_priors_raise_before_anything_changes(kwargs, name):
    bm, _ = trained_model(steps=1)
    state = {k: v.clone() for k, v in bm.state_dict().items()}
    rng = torch.get_rng_state()
    originals = {n: p for n, p in bm.base.named_parameters()}

    with pytest.raises(ValueError, match=name):
        bm.kl_divergence(**kwargs)

    with pytest.raises(ValueError, match=name):
        with bm.reparameterize(return_kl=True, **kwargs):
            pass

    # Nothing was drawn, swapped, or left active.
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(bm.base.get_parameter(n) is p for n, p in originals.items())
    assert all(torch.equal(v, state[k]) for k, v in bm.state_dict().items())

    with bm.reparameterize(return_kl=True) as (_, kl):
        assert torch.isfinite(kl)
