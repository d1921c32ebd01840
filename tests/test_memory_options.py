r"""The memory options of BayesianModel: ``keep_base_weights=False`` (the base model's slots
hold the means, no copy of the frozen weights) and ``posterior_dtype`` (a bfloat16 posterior of
a float32 model)."""

import pytest
import torch
import torch.nn as nn
import zuko.bayesian

from torch.func import functional_call

import fastbnf

from fastbnf.optim import VariationalAdam


def net():
    return nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2))


def wrapped(**kwargs):
    torch.manual_seed(0)
    return fastbnf.BayesianModel(net(), init_logvar=-4.0, **kwargs)


def train(bm, optimizer=None, steps=5, variational=False):
    r"""A few steps of the seed's loop (Adam on the posterior), or of VariationalAdam's."""

    generator = torch.Generator().manual_seed(1)
    if optimizer is None:
        optimizer = torch.optim.Adam(bm.parameters(), lr=1e-2)
    losses = []
    for step in range(steps):
        x = torch.randn(32, 3, generator=generator)
        y = x[:, :2].sin()
        torch.manual_seed(100 + step)
        if variational:
            loss = (bm.base(x) - y).square().mean()
            loss.backward()
        else:
            kl = bm.kl_divergence()
            with bm.reparameterize() as model:
                loss = (model(x) - y).square().mean() + 1e-3 * kl
                loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


# keep_base_weights=False


def test_the_base_model_holds_the_means():
    bm = wrapped(keep_base_weights=False)
    x = torch.randn(4, 3)
    names = {key: key.replace("-", ".") for key in bm.means}
    for key, name in names.items():
        assert bm.base.get_parameter(name) is bm.means[key]
    means = {name: bm.means[key] for key, name in names.items()}
    torch.testing.assert_close(bm.base(x), functional_call(net(), means, (x,)))
    # No frozen copy: the model's unique parameters are the posterior's.
    posterior = sum(p.numel() for p in [*bm.means.values(), *bm.logvars.values()])
    assert sum(p.numel() for p in bm.parameters()) == posterior


@pytest.mark.parametrize("variational", [False, True])
def test_trains_as_with_the_base_weights(backend, variational):
    runs = []
    for keep in (True, False):
        bm = wrapped(keep_base_weights=keep)
        optimizer = VariationalAdam(bm, lr=1e-2, kl_weight=1e-3) if variational else None
        runs.append((train(bm, optimizer, variational=variational), bm))
    (losses, kept), (losses_without, without) = runs
    assert losses == losses_without
    for key in kept.means:
        assert torch.equal(kept.means[key], without.means[key])
        assert torch.equal(kept.logvars[key], without.logvars[key])


def test_state_dicts_keep_zukos_keys_and_load_its_checkpoints():
    bm = wrapped(keep_base_weights=False)
    theirs = zuko.bayesian.BayesianModel(net())
    assert sorted(bm.state_dict()) == sorted(theirs.state_dict())
    # A zuko checkpoint: the means come from means.*, not from the base model's weights.
    with torch.no_grad():
        for key in theirs.means:
            theirs.means[key].add_(1.0)
    bm.load_state_dict(theirs.state_dict())
    for key in theirs.means:
        assert torch.equal(bm.means[key], theirs.means[key])
    # Its own state dict round-trips.
    again = wrapped(keep_base_weights=False)
    again.load_state_dict(bm.state_dict())
    for key in bm.means:
        assert torch.equal(again.means[key], bm.means[key])


def test_prior_mean_init_is_refused_before_anything_changes():
    bm = wrapped(keep_base_weights=False)
    before = {k: v.clone() for k, v in bm.state_dict().items()}
    with pytest.raises(ValueError, match=r"prior_mean='init' needs the base model's weights"):
        bm.kl_divergence(prior_mean="init")
    with pytest.raises(ValueError, match=r"keep_base_weights=False"):
        VariationalAdam(bm, prior_mean="init")
    assert bm._slots.held is None
    for key, value in bm.state_dict().items():
        assert torch.equal(value, before[key]), key


# posterior_dtype


def test_a_bfloat16_posterior_samples_in_the_models_dtype(backend):
    dtype = torch.bfloat16
    low = wrapped(posterior_dtype=dtype)
    assert all(p.dtype == dtype for p in [*low.means.values(), *low.logvars.values()])
    assert low.sample_dtype == torch.float32

    # The same samples and KL as a float32 posterior holding the same (rounded) values: the
    # kernels compute in float32 whatever the storage.
    wide = wrapped()
    with torch.no_grad():
        for key in wide.means:
            wide.means[key].copy_(low.means[key])
            wide.logvars[key].copy_(low.logvars[key])
    torch.manual_seed(3)
    ours = low.sample_params()
    torch.manual_seed(3)
    expected = wide.sample_params()
    for key in ours:
        assert ours[key].dtype == torch.float32
        assert torch.equal(ours[key], expected[key])
    assert low.kl_divergence().dtype == dtype
    assert torch.equal(low.kl_divergence(), wide.kl_divergence().to(dtype))


@pytest.mark.parametrize("variational", [False, True])
def test_a_bfloat16_posterior_trains(backend, variational):
    bm = wrapped(posterior_dtype=torch.bfloat16)
    optimizer = VariationalAdam(bm, lr=1e-2, kl_weight=1e-3) if variational else None
    losses = train(bm, optimizer, steps=30, variational=variational)
    assert losses[-1] < 0.5 * losses[0]
    assert all(p.dtype == torch.bfloat16 for p in [*bm.means.values(), *bm.logvars.values()])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(posterior_dtype=torch.float64), "posterior_dtype must be"),
        (dict(posterior_dtype=torch.float16), "posterior_dtype must be"),
        (dict(sample_dtype=torch.float64), "sample_dtype must be"),
        (dict(keep_base_weights=1), "keep_base_weights must be True or False"),
        (
            dict(posterior_dtype=torch.bfloat16, keep_base_weights=False),
            "must keep the base model's dtype",
        ),
    ],
)
def test_bad_options(kwargs, match):
    base = net()
    before = [p.clone() for p in base.parameters()]
    with pytest.raises(ValueError, match=match):
        fastbnf.BayesianModel(base, **kwargs)
    for p, b in zip(base.parameters(), before):
        assert torch.equal(p, b) and p.requires_grad


def test_mixed_dtypes_need_a_sample_dtype():
    base = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2).double())
    with pytest.raises(ValueError, match="give sample_dtype"):
        fastbnf.BayesianModel(base, posterior_dtype=torch.bfloat16)
