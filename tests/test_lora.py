r"""Bayesian LoRA: a fastbnf.BayesianModel over the LoRA factors of a peft model of a tiny
transformers GPT-2 (built from a config, random weights, nothing downloaded), side by side with
zuko.bayesian.BayesianModel."""

import os
import pytest
import torch
import torch.nn as nn
import zuko.bayesian

from contextlib import nullcontext
from torch.func import functional_call

import fastbnf

try:
    import peft  # noqa: F401
    import transformers  # noqa: F401
except ImportError:
    # CI installs them (make setup): there a missing one is a failure, not a skip.
    if os.environ.get("CI"):
        raise
    pytest.skip(
        "peft and transformers are not installed (pip install -e '.[lora]')",
        allow_module_level=True,
    )

from examples.bayesian_lora import BLOB, LORA, counting, lora_gpt2, posterior_mean, run
from zuko_noise import zuko_draws

VOCAB, LENGTH = 64, 12


def tiny(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    r"""A peft LoRA (rank 4) on every projection of a 2-layer GPT-2 of width 32."""

    torch.manual_seed(seed)
    return lora_gpt2(vocab=VOCAB, width=32, layers=2, heads=2, positions=LENGTH, rank=4).to(dtype)


def wrapped(seed: int = 0, dtype: torch.dtype = torch.float32, **kwargs):
    return fastbnf.BayesianModel(tiny(seed, dtype), include_params=LORA, **kwargs)


def data(n: int = 16, seed: int = 1) -> torch.Tensor:
    return counting(n, 0, VOCAB // 2, LENGTH, torch.Generator().manual_seed(seed))


def loss_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    r"""Next-token cross-entropy in the model's dtype (the model's own ``.loss`` is fp32)."""

    logits = model(input_ids=x).logits
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())


def mean_loss(bm, x) -> float:
    r"""The loss of the model at the posterior mean."""

    with torch.no_grad():
        logits = functional_call(bm.base, posterior_mean(bm), (), {"input_ids": x}).logits
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()).item()


def fit(bm, x: torch.Tensor, style: str, steps: int = 25):
    r"""Trains on ``x`` with the tutorial's loop (``"seed"``) or VariationalAdam's (``"optim"``);
    returns the optimizer."""

    if style == "optim":
        optimizer = fastbnf.optim.VariationalAdam(bm, lr=1e-2, kl_weight=1e-5)
    else:
        optimizer = torch.optim.Adam(bm.parameters(), lr=1e-2)

    for _ in range(steps):
        if style == "optim":  # a plain model's loop: the base holds the current sample
            loss_of(bm.base, x).backward()
        else:
            kl = bm.kl_divergence()
            with bm.reparameterize() as model:
                (loss_of(model, x) + 1e-5 * kl).backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


def lora_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]


def slot(model: nn.Module, name: str) -> torch.Tensor:
    r"""What a parameter's slot holds: inside reparameterize() a sample, not a Parameter."""

    prefix, _, attribute = name.rpartition(".")
    return getattr(model.get_submodule(prefix), attribute)


def test_only_the_lora_factors_are_bayesian():
    bm = wrapped()
    names = lora_names(bm.base)

    # 2 blocks x 4 projections (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj) x (A, B).
    assert len(names) == 16
    assert list(bm.means) == [n.replace(".", "-") for n in names]
    assert list(bm.logvars) == list(bm.means)
    assert names[0] == "base_model.model.transformer.h.0.attn.c_attn.lora_A.default.weight"
    for name in names:
        torch.testing.assert_close(bm.means[name.replace(".", "-")], bm.base.get_parameter(name))

    # The trainable parameters are the posterior's; the whole base, adapters included, is frozen.
    trainable = {n for n, p in bm.named_parameters() if p.requires_grad}
    assert trainable == {f"{d}.{k}" for d in ("means", "logvars") for k in bm.means}

    # prior_mean="init" centres the prior on peft's initialization: at wrap time the KL to it
    # lacks the means' term of the KL to N(0, 1), 0.5 * sum(mu^2).
    squares = sum(m.detach().double().square().sum() for m in bm.means.values())
    torch.testing.assert_close(
        bm.kl_divergence(prior_mean="init").double(),
        bm.kl_divergence().double() - squares / 2,
        rtol=1e-5,
        atol=0,
    )

    # zuko selects the same parameters with the same keys.
    theirs = zuko.bayesian.BayesianModel(tiny(), include_params=LORA)
    assert list(theirs.means) == list(bm.means)
    assert list(theirs.state_dict()) == list(bm.state_dict())


@pytest.mark.parametrize("style", ["seed", "optim"])
def test_training_moves_only_the_lora_posterior(backend, style):
    bm = wrapped()
    x = data()
    before = {k: v.clone() for k, v in bm.state_dict().items()}
    loss_before = mean_loss(bm, x)

    optimizer = fit(bm, x, style)

    assert mean_loss(bm, x) < loss_before - 1.0, (loss_before, mean_loss(bm, x))

    # Every mean and log-variance moved; nothing else did (the state dict keeps the frozen
    # weights under base.* while VariationalAdam holds its samples in the base model).
    after = bm.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"{d}.{k}" for d in ("means", "logvars") for k in bm.means}
    assert all(p.grad is None for p in bm.base.parameters() if not p.requires_grad)

    if style == "optim":
        samples = [bm.base.get_parameter(n) for n in lora_names(bm.base)]
        assert all(p.requires_grad for p in samples)
        optimizer.release()
    for name, param in bm.base.named_parameters():
        assert torch.equal(param, before[f"base.{name}"]), name
        assert not param.requires_grad, name


@pytest.mark.parametrize("style", ["seed", "optim"])
def test_blob_puts_the_posterior_on_a_and_trains_b_as_a_point(backend, style):
    r"""BLoB's selection: the A factors Bayesian, the B factors plain trainable parameters, which
    both loops train (the tutorial's optimizer over bm.parameters(); VariationalAdam's AdamW on
    the non-Bayesian parameters)."""

    bm = fastbnf.BayesianModel(tiny(), include_params=BLOB)
    names = lora_names(bm.base)
    a = [n for n in names if ".lora_A." in n]
    b = [n for n in names if ".lora_B." in n]
    assert len(a) == len(b) == 8
    assert list(bm.means) == [n.replace(".", "-") for n in a]
    assert all(bm.base.get_parameter(n).requires_grad for n in b)
    b_before = {n: bm.base.get_parameter(n).detach().clone() for n in b}
    means_before = {k: v.detach().clone() for k, v in bm.means.items()}
    x = data()
    loss_before = mean_loss(bm, x)

    fit(bm, x, style)

    assert mean_loss(bm, x) < loss_before - 1.0
    assert all(not torch.equal(bm.base.get_parameter(n), b_before[n]) for n in b)
    assert all(not torch.equal(bm.means[k], v) for k, v in means_before.items())


def test_samples_differ_the_predictive_is_reproducible(backend):
    bm = wrapped(init_logvar=-4.0)
    x = data(4)

    with torch.no_grad():
        with bm.reparameterize() as model:
            first = model(input_ids=x).logits
            assert torch.equal(model(input_ids=x).logits, first)  # one sample per context
        with bm.reparameterize() as model:
            second = model(input_ids=x).logits
        assert not torch.allclose(first, second, rtol=0, atol=1e-4)

        torch.manual_seed(7)
        y = bm.predict(input_ids=x, samples=4)  # a ModelOutput, its tensors stacked
        torch.manual_seed(7)
        again = bm.predict(input_ids=x, samples=4).logits
        torch.manual_seed(7)
        params = bm.sample_params(n=4)

        assert y.logits.shape == (4, 4, LENGTH, VOCAB)
        assert torch.equal(again, y.logits)
        assert not torch.allclose(y.logits[0], y.logits[1], rtol=0, atol=1e-4)
        for k in range(4):
            one = functional_call(bm.base, {n: p[k] for n, p in params.items()}, (x,))
            torch.testing.assert_close(y.logits[k], one.logits)

        # The model at the posterior mean: deterministic, and the centre of the samples.
        at_mean = functional_call(bm.base, posterior_mean(bm), (x,)).logits
        assert torch.equal(functional_call(bm.base, posterior_mean(bm), (x,)).logits, at_mean)
        spread = (y.logits - at_mean).abs().mean()
        assert (y.logits.mean(dim=0) - at_mean).abs().mean() < spread


def test_state_dict_round_trip(backend, tmp_path):
    bm = wrapped()
    x = data()
    optimizer = torch.optim.Adam(bm.parameters(), lr=1e-2)
    for _ in range(3):
        with bm.reparameterize(return_kl=True) as (model, kl):
            (loss_of(model, x) + 1e-5 * kl).backward()
        optimizer.step()
        optimizer.zero_grad()
    torch.save(bm.state_dict(), tmp_path / "lora.pt")

    fresh = wrapped(seed=1, init_logvar=-5.0)  # other base weights, adapters and posterior
    assert mean_loss(fresh, x) != mean_loss(bm, x)
    fresh.load_state_dict(torch.load(tmp_path / "lora.pt"))

    for key, value in bm.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert torch.equal(fresh.kl_divergence(), bm.kl_divergence())
    with torch.no_grad():
        torch.manual_seed(3)
        expected = bm.predict(input_ids=x, samples=3).logits
        torch.manual_seed(3)
        assert torch.equal(fresh.predict(input_ids=x, samples=3).logits, expected)

    # The posterior alone (a LoRA checkpoint without the frozen model) over the same base.
    posterior = {k: v for k, v in bm.state_dict().items() if not k.startswith("base.")}
    assert len(posterior) == 2 * len(bm.means)
    same_base = wrapped(seed=0, init_logvar=-5.0)
    same_base.load_state_dict(posterior, strict=False)
    with torch.no_grad():
        torch.manual_seed(3)
        assert torch.equal(same_base.predict(input_ids=x, samples=3).logits, expected)


@pytest.mark.parametrize("style", ["seed", "optim"])
def test_steps_equal_zukos_with_the_same_noise(backend, style):
    theirs = zuko.bayesian.BayesianModel(tiny(dtype=torch.float64), include_params=LORA)
    ours = wrapped(dtype=torch.float64, init_logvar=-4.0)
    with torch.no_grad():
        for key in theirs.means:  # zuko's lora_B means are 0: move them
            theirs.means[key].normal_(0.0, 0.1)
            theirs.logvars[key].normal_(-4.0, 1.0)
    ours.load_state_dict(theirs.state_dict())
    x, lam, lr = data(), 1e-3, 1e-2
    torch.testing.assert_close(ours.kl_divergence(), theirs.kl_divergence(), rtol=1e-12, atol=0)

    if style == "optim":
        optimizer = fastbnf.optim.VariationalAdam(ours, lr=lr, kl_weight=lam)
    else:
        optimizer = torch.optim.Adam(ours.parameters(), lr=lr)
    reference = torch.optim.Adam(theirs.parameters(), lr=lr, foreach=False)

    def noise_of(samples):
        r"""The noise of the samples ours drew, one tensor per key, in key order."""

        noise = []
        for key, sample in zip(ours.means, samples):
            sigma = fastbnf.reference.softclip(ours.logvars[key].detach()).div(2).exp()
            noise.append((sample.detach() - ours.means[key].detach()) / sigma)
        return noise

    for _ in range(4):
        names = lora_names(ours.base)
        if style == "optim":
            noise = noise_of([ours.base.get_parameter(n) for n in names])
            loss = loss_of(ours.base, x)
            loss.backward()
        else:
            kl = ours.kl_divergence()
            with ours.reparameterize() as model:
                noise = noise_of([slot(model, n) for n in names])
                loss = loss_of(model, x)
                (loss + lam * kl).backward()
        optimizer.step()
        optimizer.zero_grad()

        draws = iter(noise)
        with zuko_draws(lambda t: next(draws)):
            kl = theirs.kl_divergence()
            with theirs.reparameterize() as model:
                zuko_loss = loss_of(model, x)
            (zuko_loss + lam * kl).backward()
        reference.step()
        reference.zero_grad()

        torch.testing.assert_close(loss, zuko_loss, rtol=1e-10, atol=1e-12)
        for key in theirs.means:
            torch.testing.assert_close(ours.means[key], theirs.means[key], rtol=1e-9, atol=1e-11)
            torch.testing.assert_close(
                ours.logvars[key], theirs.logvars[key], rtol=1e-9, atol=1e-11
            )


def test_local_trick_equals_zukos(backend):
    # Every LoRA factor is an nn.Linear without bias: the trick takes all of them.
    theirs = zuko.bayesian.BayesianModel(tiny(dtype=torch.float64), include_params=LORA)
    ours = wrapped(dtype=torch.float64)
    with torch.no_grad():
        for key in theirs.means:
            theirs.means[key].normal_(0.0, 0.1)
            theirs.logvars[key].normal_(-4.0, 1.0)
    ours.load_state_dict(theirs.state_dict())
    assert len(ours._trick.plan()[0]) == len(lora_names(ours.base))
    x = data()

    losses = []
    for bm in (ours, theirs):
        torch.manual_seed(5)  # the same eta, drawn by torch.randn layer after layer
        # zuko also samples the weights the trick replaces: no draws there.
        no_draws = zuko_draws(torch.zeros_like) if bm is theirs else nullcontext()
        with no_draws, bm.reparameterize(local_trick=True) as model:
            loss = loss_of(model, x)
        loss.backward()
        losses.append(loss)

    torch.testing.assert_close(losses[0], losses[1], rtol=1e-12, atol=0)
    for key in theirs.means:
        torch.testing.assert_close(ours.means[key].grad, theirs.means[key].grad)
        torch.testing.assert_close(ours.logvars[key].grad, theirs.logvars[key].grad)


def test_example_runs_and_is_less_sure_out_of_distribution(tmp_path):
    path = tmp_path / "lora.png"
    summary = run(path, steps=100, samples=4, length=LENGTH)
    seen, unseen, random = summary.values()

    assert path.stat().st_size > 0
    assert seen["loss"] < 1.0
    assert seen["entropy"] < unseen["entropy"] and seen["entropy"] < random["entropy"]
    assert seen["mutual_info"] < unseen["mutual_info"]
