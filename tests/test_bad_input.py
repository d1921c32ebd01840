r"""Bad input gets a clear error naming the argument, before any state changes."""

import math
import pytest
import torch
import torch.nn as nn

import fastbnf

from zuko.nn import MLP


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("prefix", ["0.weight[", "a b", "x/y", "$"])
def test_invalid_glob(prefix):
    base = MLP(3, 5)
    with pytest.raises(ValueError, match="include_params: invalid prefix"):
        fastbnf.BayesianModel(base, include_params=[prefix])
    with pytest.raises(ValueError, match="exclude_params: invalid prefix"):
        fastbnf.BayesianModel(base, exclude_params=[prefix])
    assert all(p.requires_grad for p in base.parameters())  # nothing frozen


def test_prefixes_as_a_string():
    with pytest.raises(ValueError, match="include_params: expected a list"):
        fastbnf.BayesianModel(MLP(3, 5), include_params="0.weight")


def test_selection_of_nothing():
    with pytest.raises(ValueError, match=r"include_params=\['nothing'\].*select no parameter"):
        fastbnf.BayesianModel(MLP(3, 5), include_params=["nothing"])
    with pytest.raises(ValueError, match="select no parameter"):
        fastbnf.BayesianModel(MLP(3, 5), exclude_params=[""])


def test_non_floating_parameter():
    base = nn.Linear(2, 2)
    base.register_parameter("steps", nn.Parameter(torch.zeros(3, dtype=torch.int64), False))

    with pytest.raises(ValueError, match="'steps' has dtype torch.int64"):
        fastbnf.BayesianModel(base)
    assert base.weight.requires_grad


@pytest.mark.parametrize("value", [math.nan, math.inf, "1", None, True])
def test_init_logvar(value):
    with pytest.raises(ValueError, match="init_logvar must be a finite number"):
        fastbnf.BayesianModel(MLP(3, 5), init_logvar=value)


def test_sample_dtype():
    with pytest.raises(ValueError, match="sample_dtype"):
        fastbnf.BayesianModel(MLP(3, 5), sample_dtype=torch.int8)


@pytest.mark.parametrize("prior_var", [0.0, -1.0, math.nan, math.inf, "a", {"0-weight": -2.0}, {"nope": 1.0}])
def test_prior_var(prior_var):
    model = fastbnf.BayesianModel(MLP(3, 5))

    with pytest.raises(ValueError, match="prior_var"):
        model.kl_divergence(prior_var)
    with pytest.raises(ValueError, match="prior_var"):
        with model.reparameterize(return_kl=True, prior_var=prior_var):
            pass
    assert not model._active


@pytest.mark.parametrize("prior_mean", [0.5, "zero", None])
def test_prior_mean(prior_mean):
    with pytest.raises(ValueError, match="prior_mean must be 0.0 or 'init'"):
        fastbnf.BayesianModel(MLP(3, 5)).kl_divergence(prior_mean=prior_mean)


@pytest.mark.parametrize("n", [0, -1, 1.5, True])
def test_sample_count(n):
    with pytest.raises(ValueError, match="n must be None or a positive integer"):
        fastbnf.BayesianModel(MLP(3, 5)).sample_params(n=n)


def test_state_dict_problems_are_all_reported_before_any_copy():
    model = fastbnf.BayesianModel(MLP(3, 5))
    before = snapshot(model)
    state = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    state["means.0-weight"] = torch.zeros(2, 2)
    del state["logvars.0-bias"]
    state["extra"] = torch.zeros(1)

    with pytest.raises(RuntimeError) as error:
        model.load_state_dict(state)

    message = str(error.value)
    assert "means.0-weight: shape (2, 2)" in message
    assert "logvars.0-bias: missing" in message
    assert "extra: unexpected" in message
    assert_unchanged(model, before)


def test_non_strict_load_still_checks_shapes():
    model = fastbnf.BayesianModel(MLP(3, 5))
    before = snapshot(model)
    state = {"means.0-bias": torch.zeros(64), "means.2-bias": torch.zeros(7)}

    with pytest.raises(RuntimeError, match="means.2-bias: shape"):
        model.load_state_dict(state, strict=False)
    assert_unchanged(model, before)


def test_nested_reparameterize():
    model = fastbnf.BayesianModel(MLP(3, 5))

    with model.reparameterize():
        with pytest.raises(RuntimeError, match="already active"):
            with model.reparameterize():
                pass
    with model.reparameterize():  # usable again once the context closed
        pass


def test_forcing_an_unavailable_backend(monkeypatch):
    ops_input = fastbnf.BayesianModel(nn.Linear(2, 2))

    monkeypatch.setenv("FASTBNF_BACKEND", "tpu")
    with pytest.raises(ValueError, match="FASTBNF_BACKEND='tpu' is not a backend"):
        ops_input.kl_divergence()

    monkeypatch.setenv("FASTBNF_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="cannot run tensors on device type 'cpu'"):
        ops_input.kl_divergence()
