r"""BayesianModel.predict: the base model under K posterior samples, vmapped."""

import pytest
import torch
import torch.nn as nn
import zuko

from torch.func import functional_call

import fastbnf


def mlp_model(**kwargs) -> fastbnf.BayesianModel:
    torch.manual_seed(0)
    net = zuko.nn.MLP(5, 3, hidden_features=(16, 16), activation=nn.ELU)
    return fastbnf.BayesianModel(net, init_logvar=-4.0, **kwargs)


def test_shape_and_loop_equivalence(backend):
    bm = mlp_model()
    x = torch.randn(7, 5)

    with torch.random.fork_rng():
        torch.manual_seed(1)
        y = bm.predict(x, samples=6)

    # The same draws, evaluated one by one.
    with torch.random.fork_rng():
        torch.manual_seed(1)
        params = bm.sample_params(n=6)

    loop = torch.stack(
        [functional_call(bm.base, {k: v[i] for k, v in params.items()}, (x,)) for i in range(6)]
    )

    assert y.shape == (6, 7, 3)
    torch.testing.assert_close(y, loop)

    # Samples differ from one another.
    assert not torch.allclose(y[0], y[1])


@pytest.mark.parametrize("chunk_size", [1, 4, 6, 100])
def test_chunking_is_identical(backend, chunk_size):
    bm = mlp_model()
    x = torch.randn(7, 5)

    torch.manual_seed(2)
    full = bm.predict(x, samples=6)
    torch.manual_seed(2)
    chunked = bm.predict(x, samples=6, chunk_size=chunk_size)

    torch.testing.assert_close(chunked, full, rtol=1e-6, atol=1e-6)


def test_partial_selection_and_kwargs():
    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.hidden = nn.Sequential(nn.Linear(5, 16), nn.ELU())
            self.head = nn.Linear(16, 3)

        def forward(self, x, scale=1.0):
            h = self.hidden(x)
            return self.head(h) * scale, {"hidden": h}

    torch.manual_seed(0)
    # Only the head is Bayesian: the hidden layer keeps the base model's values.
    bm = fastbnf.BayesianModel(Wrapped(), init_logvar=-4.0, include_params=["head"])
    x = torch.randn(3, 5)

    torch.manual_seed(1)
    y, extra = bm.predict(x, samples=4, scale=2.0)
    torch.manual_seed(1)
    y1, _ = bm.predict(x, samples=4)

    assert y.shape == (4, 3, 3)
    torch.testing.assert_close(y, 2 * y1)
    torch.testing.assert_close(extra["hidden"], bm.base.hidden(x).expand(4, 3, 16))


def test_gradients_flow_to_the_posterior(backend):
    bm = mlp_model()
    x = torch.randn(7, 5)

    bm.predict(x, samples=3).square().mean().backward()

    for key in bm.means:
        assert bm.means[key].grad is not None and bm.means[key].grad.abs().sum() > 0
        assert bm.logvars[key].grad is not None and torch.isfinite(bm.logvars[key].grad).all()
        assert bm.base.get_parameter(key.replace("-", ".")).grad is None


def test_predictive_statistics(backend):
    # A single Bayesian linear map: the predictive mean and variance are known in closed form.
    torch.manual_seed(3)
    bm = fastbnf.BayesianModel(nn.Linear(4, 2), init_logvar=-2.0)
    x = torch.randn(4)

    with torch.no_grad():
        y = bm.predict(x, samples=20000)

    var_w = bm.logvars["weight"].detach().exp()
    var_b = bm.logvars["bias"].detach().exp()
    mean = bm.means["weight"].detach() @ x + bm.means["bias"].detach()
    variance = var_w @ x.square() + var_b

    se = (variance / 20000).sqrt()
    assert ((y.mean(0) - mean).abs() < 5 * se).all()
    torch.testing.assert_close(y.var(0), variance, rtol=0.06, atol=0.0)


def test_flow_output_is_a_clear_type_error():
    torch.manual_seed(0)
    bm = fastbnf.BayesianModel(zuko.flows.NSF(2, 1, transforms=1))

    with pytest.raises(TypeError, match=r"sample_params\(n=K\)"):
        bm.predict(torch.randn(1), samples=2)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"samples": 0},
        {"samples": -2},
        {"samples": 2.0},
        {"samples": True},
        {"samples": None},
        {"samples": 4, "chunk_size": 0},
        {"samples": 4, "chunk_size": 1.5},
        {"samples": 4, "chunk_size": False},
    ],
)
def test_bad_arguments_fail_before_sampling(kwargs):
    bm = mlp_model()
    x = torch.randn(2, 5)
    state = torch.get_rng_state()
    argument = "chunk_size" if "chunk_size" in kwargs else "samples"

    with pytest.raises(ValueError, match=argument):
        bm.predict(x, **kwargs)

    # Nothing was drawn.
    assert torch.equal(torch.get_rng_state(), state)


def test_samples_is_required():
    with pytest.raises(TypeError, match="samples"):
        mlp_model().predict(torch.randn(2, 5))
