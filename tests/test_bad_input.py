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


@pytest.mark.parametrize(
    "prior_var", [0.0, -1.0, math.nan, math.inf, "a", {"0-weight": -2.0}, {"nope": 1.0}]
)
def test_prior_var(prior_var):
    model = fastbnf.BayesianModel(MLP(3, 5))

    with pytest.raises(ValueError, match="prior_var"):
        model.kl_divergence(prior_var)
    with pytest.raises(ValueError, match="prior_var"):
        with model.reparameterize(return_kl=True, prior_var=prior_var):
            pass
    assert not model._slots.active


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


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_fold_rank_is_a_bool(value):
    base = MLP(3, 5)
    with pytest.raises(ValueError, match="fold_rank must be True or False"):
        fastbnf.BayesianModel(base, fold_rank=value)
    assert all(p.requires_grad for p in base.parameters())  # nothing frozen


def test_numpy_integers_count_as_integers():
    np = pytest.importorskip("numpy")
    model = fastbnf.BayesianModel(MLP(3, 5))

    params = model.sample_params(n=np.int64(3))
    assert all(p.shape[0] == 3 for p in params.values())
    assert model.predict(torch.randn(2, 3), samples=np.int32(4)).shape == (4, 2, 5)
    with pytest.raises(ValueError, match="samples must be a positive integer"):
        model.predict(torch.randn(2, 3), samples=np.int64(0))


def test_zero_dim_tensor_prior_var():
    model = fastbnf.BayesianModel(MLP(3, 5))

    expected = model.kl_divergence(2.5)
    torch.testing.assert_close(model.kl_divergence(torch.tensor(2.5)), expected)
    with pytest.raises(ValueError, match="prior_var must be a finite number"):
        model.kl_divergence(torch.tensor([2.5, 1.0]))
    with pytest.raises(ValueError, match="prior_var must be positive"):
        model.kl_divergence(torch.tensor(-1.0))


def test_init_logvar_that_overflows_the_dtype():
    base = MLP(3, 5).half()
    with pytest.raises(
        ValueError, match="init_logvar=100000.0 overflows torch.float16, the dtype of '0.weight'"
    ):
        fastbnf.BayesianModel(base, init_logvar=1e5)
    assert all(p.requires_grad for p in base.parameters())
    fastbnf.BayesianModel(MLP(3, 5), init_logvar=1e5)  # fine in float32


@pytest.mark.parametrize("bad", ["list", "meta"])
def test_state_dict_values_are_checked_before_any_copy(bad):
    model = fastbnf.BayesianModel(MLP(3, 5))
    before = snapshot(model)
    state = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    key = sorted(state)[-1]  # after the others: PyTorch would have copied them already
    state[key] = (
        state[key].tolist() if bad == "list" else torch.empty_like(state[key], device="meta")
    )

    message = "a list, not a tensor" if bad == "list" else "a meta tensor"
    with pytest.raises(RuntimeError, match=f"{key}: {message}"):
        model.load_state_dict(state)
    assert_unchanged(model, before)
