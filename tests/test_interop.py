r"""Checkpoints move both ways between zuko.bayesian.BayesianModel and fastbnf.BayesianModel."""

import pytest
import torch
import torch.nn as nn
import zuko
import zuko.bayesian

import fastbnf

BASES = {
    "mlp": (lambda: zuko.nn.MLP(5, 5, hidden_features=(16, 16), activation=nn.ELU), {}),
    "nsf-partial": (
        lambda: zuko.flows.NSF(3, 2, transforms=2, hidden_features=(16, 16)),
        {"include_params": ["transform.transforms.*.hyper.4"], "exclude_params": ["**.bias"]},
    ),
}


def models(name, seed):
    r"""A zuko and a fastbnf model over the same architecture, initialized differently."""

    base_fn, kwargs = BASES[name]
    torch.manual_seed(seed)
    zuko_model = zuko.bayesian.BayesianModel(base_fn(), init_logvar=-5.0, **kwargs)
    torch.manual_seed(seed + 1)
    ours = fastbnf.BayesianModel(base_fn(), init_logvar=-7.0, **kwargs)
    return zuko_model, ours


def train(model, steps=3):
    r"""Moves the posterior away from its initialization, so that a checkpoint carries news."""

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = sum(p.square().sum() for p in model.means.values()) - sum(
            lv.sum() for lv in model.logvars.values()
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def assert_same_posterior(zuko_model, ours):
    assert list(zuko_model.means) == list(ours.means)
    for key in zuko_model.means:
        assert torch.equal(zuko_model.means[key], ours.means[key]), key
        assert torch.equal(zuko_model.logvars[key], ours.logvars[key]), key
    for name, param in zuko_model.base.named_parameters():
        assert torch.equal(param, ours.base.get_parameter(name)), name

    for prior_var in (1.0, 0.2):
        expected = zuko_model.kl_divergence(prior_var=prior_var)
        torch.testing.assert_close(ours.kl_divergence(prior_var=prior_var), expected)


@pytest.mark.parametrize("name", BASES)
def test_zuko_checkpoint_loads_into_fastbnf(backend, tmp_path, name):
    zuko_model, ours = models(name, seed=0)
    train(zuko_model)

    torch.save(zuko_model.state_dict(), tmp_path / "zuko.pt")
    ours.load_state_dict(torch.load(tmp_path / "zuko.pt", weights_only=True))

    assert_same_posterior(zuko_model, ours)

    # The selected base parameters stay frozen after the load.
    for key in ours.means:
        assert not ours.base.get_parameter(key.replace("-", ".")).requires_grad


@pytest.mark.parametrize("name", BASES)
def test_fastbnf_checkpoint_loads_into_zuko(backend, tmp_path, name):
    zuko_model, ours = models(name, seed=2)
    train(ours)

    torch.save(ours.state_dict(), tmp_path / "fastbnf.pt")
    zuko_model.load_state_dict(torch.load(tmp_path / "fastbnf.pt", weights_only=True))

    assert_same_posterior(zuko_model, ours)


def test_same_keys_both_ways():
    zuko_model, ours = models("nsf-partial", seed=4)
    assert zuko_model.state_dict().keys() == ours.state_dict().keys()
    for key, value in zuko_model.state_dict().items():
        assert value.shape == ours.state_dict()[key].shape
