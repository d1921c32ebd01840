r"""The variational Adam step of a group (fastbnf.optim.variational_adam_step) against zuko's
loop: the same noise injected into zuko's ``reparameterize()``, its KL, ``backward()`` and
``torch.optim.Adam`` (or AdamW) on its means and log-variances, step for step."""

import copy

import pytest
import torch
import torch.nn as nn
import zuko.bayesian

from torch.func import functional_call

import fastbnf

from fastbnf import ops
from fastbnf._backend import has_kernel
from fastbnf.optim import VariationalAdam, variational_adam_step

from zuko_noise import zuko_draws


def flat_moments(means):
    r"""Adam's zero moments of a group, flat: the means', then the log-variances'."""

    n = sum(m.numel() for m in means)
    return means[0].new_zeros(2 * n), means[0].new_zeros(2 * n)


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
    (group,) = ours._posterior.groups()
    x, y = torch.randn(32, 3, dtype=dtype), torch.randn(32, 2, dtype=dtype)
    lam, prior_var, lr, betas = 1e-2, 0.5, 1e-2, (0.9, 0.99)

    # Ours: the group's moments, its first sample, then steps.
    means, logvars = group.means, group.logvars
    exp_avgs, exp_avg_sqs = flat_moments(means)
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
        rng_state = variational_adam_step(
            grad_theta,
            means,
            logvars,
            exp_avgs,
            exp_avg_sqs,
            theta,
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
        with zuko_draws(lambda t: next(draws).to(t.dtype)):
            optimizer.zero_grad()
            kl = theirs.kl_divergence(prior_var=prior_var)
            with theirs.reparameterize() as model:
                zuko_loss = (model(x) - y).square().mean() + lam * kl
            zuko_loss.backward()
        optimizer.step()

        torch.testing.assert_close(loss, zuko_loss - lam * kl.detach(), **tolerance)
        for key, mean, logvar in zip(group.keys, means, logvars):
            torch.testing.assert_close(mean, theirs.means[key], **tolerance, msg=key)
            torch.testing.assert_close(logvar, theirs.logvars[key], **tolerance, msg=key)


def test_the_next_sample_comes_from_the_updated_posterior(backend):
    ours, _ = twins(torch.float64, init_logvar=-2.0)
    (group,) = ours._posterior.groups()
    means, logvars = group.means, group.logvars
    with torch.no_grad():
        theta, _, rng_state = ops.sample(means, logvars)
    grad_theta = torch.randn_like(theta)

    next_state = variational_adam_step(
        grad_theta, means, logvars, *flat_moments(means), theta, rng_state, 1, lr=0.1
    )

    # A fresh key, and a sample of the updated posterior (its noise standard normal).
    assert not torch.equal(next_state, rng_state)
    sigma = torch.cat([fastbnf.reference.softclip(lv).div(2).exp().reshape(-1) for lv in logvars])
    mu = torch.cat([m.reshape(-1) for m in means])
    eps = (theta - mu) / sigma
    assert abs(eps.mean().item()) < 0.2 and 0.8 < eps.std().item() < 1.2


@pytest.mark.parametrize(
    "dtype,tolerance",
    [(torch.float64, dict(rtol=1e-12, atol=1e-14)), (torch.float32, dict(rtol=1e-5, atol=1e-6))],
)
@pytest.mark.parametrize("prior_mean", [False, True])
def test_the_fused_step_equals_the_composed_one(backend, dtype, tolerance, prior_mean):
    fused_and_composed_steps(dtype, tolerance, prior_mean, "cpu")


def fused_and_composed_steps(dtype, tolerance, prior_mean, device):
    r"""One ``adam_step`` call against its parts (``sample_backward``, AdamW on the posterior,
    ``sample``; the path of data-parallel averaging) with the same keys, over many steps and
    on a group whose tensors straddle the kernels' chunks."""

    torch.manual_seed(0)
    sizes = [(70, 90), (5,), (4099,), (3, 3)]
    means = [torch.randn(s, dtype=dtype, device=device) for s in sizes]
    logvars = [torch.randn(s, dtype=dtype, device=device) * 2 - 3 for s in sizes]
    prior = ops.Prior(
        0.5, means=[0.1 * torch.randn_like(m) for m in means] if prior_mean else None
    )
    runs = []
    for fused in (True, False):
        torch.manual_seed(1)
        mu, lv = [m.clone() for m in means], [v.clone() for v in logvars]
        exp_avgs, exp_avg_sqs = flat_moments(mu)
        with torch.no_grad():
            theta, _, rng_state = ops.sample(mu, lv, prior=prior)
        for step in range(1, 26):
            grad_theta = torch.sin(theta * step)  # a gradient that depends on the sample
            rng_state = variational_adam_step(
                grad_theta, mu, lv, exp_avgs, exp_avg_sqs, theta, rng_state, step, lr=1e-2,
                weight_decay=0.05, kl_weight=0.3, prior=prior,
                average=None if fused else (lambda flat: None),
            )  # fmt: skip
        runs.append([*mu, *lv, exp_avgs, exp_avg_sqs, theta, rng_state])
    for fused, composed in zip(*runs):
        torch.testing.assert_close(fused, composed, **tolerance)


@pytest.mark.cuda
@pytest.mark.skipif(
    not (torch.cuda.is_available() and has_kernel("cuda")),
    reason="no CUDA GPU and kernel",
)
@pytest.mark.parametrize(
    "dtype,tolerance",
    [(torch.float64, dict(rtol=1e-12, atol=1e-14)), (torch.float32, dict(rtol=1e-5, atol=1e-6))],
)
def test_the_fused_cuda_step_equals_the_composed_one(dtype, tolerance):
    fused_and_composed_steps(dtype, tolerance, True, "cuda")


def rows(tensor, rank, world):
    r"""Rank ``rank``'s rows of ``tensor`` as FSDP2 cuts them (torch.chunk on dim 0)."""

    chunks = tensor.chunk(world)
    return chunks[rank] if rank < len(chunks) else tensor[:0]


def rows_steps(dtype, prior_mean, world, device):
    r"""Steps of a group, whole, and of every rank's rows with their noise offsets (the same
    keys): the rows' results are the rows of the whole ones, bit for bit."""

    torch.manual_seed(0)
    # Rows that start mid Philox block (15 x 3: offsets not multiples of 4), a tensor of fewer
    # rows than ranks (an empty shard), one that straddles the kernels' chunks.
    sizes = [(15, 3), (3,), (1100, 5), (2, 7)]
    means = [torch.randn(s, dtype=dtype, device=device) for s in sizes]
    logvars = [torch.randn(s, dtype=dtype, device=device) * 2 - 3 for s in sizes]
    priors = [0.1 * torch.randn_like(m) for m in means] if prior_mean else None
    begins = torch.tensor([0] + [m.numel() for m in means]).cumsum(0)[:-1].tolist()
    n = sum(m.numel() for m in means)
    options = dict(lr=1e-2, weight_decay=0.05, kl_weight=0.3)

    torch.manual_seed(1)
    with torch.no_grad():
        theta, _, first = ops.sample(means, logvars, prior=ops.Prior(0.5, means=priors))
    grads = [torch.sin(theta * step) for step in (1, 2, 3)]
    whole = [m.clone() for m in (*means, *logvars)]
    moments = flat_moments(means)
    whole_theta, rng_state = theta.clone(), first
    states = []
    for step, grad in enumerate(grads, 1):
        torch.manual_seed(10 + step)  # the next key
        rng_state = variational_adam_step(
            grad, whole[:4], whole[4:], *moments, whole_theta, rng_state, step,
            prior=ops.Prior(0.5, means=priors), **options,
        )  # fmt: skip
        states.append(rng_state)

    for rank in range(world):
        mine = [rows(m, rank, world).clone() for m in (*means, *logvars)]
        pm = None if priors is None else [rows(m, rank, world) for m in priors]
        offsets = [b + rows(m, rank, world).storage_offset() for b, m in zip(begins, means)]

        def local(flat, part=0):
            return torch.cat(
                [rows(flat[part * n + b :][: m.numel()].view_as(m), rank, world).reshape(-1)
                 for b, m in zip(begins, means)]
            )  # fmt: skip

        exp_avgs, exp_avg_sqs = flat_moments(mine[:4])
        my_theta, my_state = local(theta), first
        for step, grad in enumerate(grads, 1):
            torch.manual_seed(10 + step)
            my_state = variational_adam_step(
                local(grad), mine[:4], mine[4:], exp_avgs, exp_avg_sqs, my_theta, my_state,
                step, prior=ops.Prior(0.5, means=pm), noise_offsets=offsets, **options,
            )  # fmt: skip
            assert torch.equal(my_state, states[step - 1])
        for got, expected in zip(mine, whole):
            assert torch.equal(got, rows(expected, rank, world))
        for got, expected in zip((exp_avgs, exp_avg_sqs), moments):
            assert torch.equal(got, torch.cat([local(expected), local(expected, 1)]))
        assert torch.equal(my_theta, local(whole_theta))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("prior_mean", [False, True])
@pytest.mark.parametrize("world", [2, 4])
def test_rows_steps_are_the_rows_of_the_whole_steps(backend, dtype, prior_mean, world):
    rows_steps(dtype, prior_mean, world, "cpu")


@pytest.mark.cuda
@pytest.mark.skipif(
    not (torch.cuda.is_available() and has_kernel("cuda")),
    reason="no CUDA GPU and kernel",
)
@pytest.mark.parametrize("world", [2, 4])
def test_cuda_rows_steps_are_the_rows_of_the_whole_steps(world):
    rows_steps(torch.float32, True, world, "cuda")


def test_bad_arguments_change_nothing(backend):
    ours, _ = twins(torch.float64)
    (group,) = ours._posterior.groups()
    means, logvars = group.means, group.logvars
    exp_avgs, exp_avg_sqs = flat_moments(means)
    before = [p.detach().clone() for p in [*means, *logvars]]
    with torch.no_grad():
        theta, _, rng_state = ops.sample(means, logvars)
    sample = theta.clone()

    with pytest.raises(ValueError, match="step must be an integer >= 1"):
        variational_adam_step(theta, means, logvars, exp_avgs, exp_avg_sqs, theta, rng_state, 0)
    with pytest.raises(ValueError, match=r"exp_avgs must be a contiguous tensor of shape"):
        variational_adam_step(
            theta, means, logvars, exp_avgs[:-1], exp_avg_sqs, theta, rng_state, 1
        )
    with pytest.raises(ValueError, match=r"means\[0\] is updated in place"):
        variational_adam_step(
            theta,
            [means[0].t().contiguous().t(), *means[1:]],
            logvars,
            exp_avgs,
            exp_avg_sqs,
            theta,
            rng_state,
            1,
        )
    args = (theta, means, logvars, exp_avgs, exp_avg_sqs, theta, rng_state, 1)
    with pytest.raises(ValueError, match="fastbnf::adam_step: noise_offsets has 1 entries for 4"):
        variational_adam_step(*args, noise_offsets=[0])
    with pytest.raises(ValueError, match=r"noise_offsets\[2\] must be >= 0, got -3"):
        variational_adam_step(*args, noise_offsets=[0, 48, -3, 64])
    with pytest.raises(ValueError, match=r"noise_offsets \(shards\) .* exclude average"):
        variational_adam_step(*args, noise_offsets=[0, 48, 64, 80], average=lambda flat: None)
    for p, b in zip([*means, *logvars], before):
        assert torch.equal(p, b)
    assert torch.equal(theta, sample)
    assert torch.equal(theta, sample)
    assert not exp_avgs.any() and not exp_avg_sqs.any()


# The optimizer: a plain model's loop.


def held_noise(bm, optimizer):
    r"""The noise of the samples the optimizer holds, one tensor per key, in key order."""

    noise = []
    for group, pieces in zip(bm._posterior.groups(), optimizer.samples):
        for mean, logvar, piece in zip(group.means, group.logvars, pieces):
            sigma = fastbnf.reference.softclip(logvar.detach()).div(2).exp()
            noise.append((piece.detach() - mean.detach()) / sigma)
    return noise


def test_optimizer_loop_equals_zukos_loop(backend):
    ours, theirs = twins(torch.float64)
    x, y = torch.randn(32, 3, dtype=torch.float64), torch.randn(32, 2, dtype=torch.float64)
    lam, lr = 1e-2, 1e-2
    optimizer = VariationalAdam(ours, lr=lr, kl_weight=lam, prior_var=0.5)
    reference = torch.optim.Adam(theirs.parameters(), lr=lr, foreach=False)

    for _ in range(20):
        draws = iter(held_noise(ours, optimizer))

        loss = (ours.base(x) - y).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

        with zuko_draws(lambda t: next(draws)):
            kl = theirs.kl_divergence(prior_var=0.5)
            with theirs.reparameterize() as model:
                zuko_loss = (model(x) - y).square().mean()
            (zuko_loss + lam * kl).backward()
        reference.step()
        reference.zero_grad()

        torch.testing.assert_close(loss, zuko_loss, rtol=1e-10, atol=1e-12)
        for key in theirs.means:
            torch.testing.assert_close(ours.means[key], theirs.means[key], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(
                ours.logvars[key], theirs.logvars[key], rtol=1e-10, atol=1e-12
            )


def test_non_bayesian_parameters_get_adamw(backend):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    bm = fastbnf.BayesianModel(base, include_params=["0."])
    plain = [p.detach().clone().requires_grad_() for p in base[2].parameters()]
    optimizer = VariationalAdam(bm, lr=0.1, weight_decay=0.01)
    reference = torch.optim.AdamW(plain, lr=0.1, weight_decay=0.01, foreach=False)
    x = torch.randn(8, 3, dtype=torch.float64)

    for _ in range(5):
        hidden = torch.tanh(bm.base[0](x)).detach()
        bm.base(x).sum().backward()
        torch.nn.functional.linear(hidden, *plain).sum().backward()
        optimizer.step()
        reference.step()
        optimizer.zero_grad()
        reference.zero_grad()

    for ours, theirs in zip(base[2].parameters(), plain):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)


def test_state_dicts_round_trip_and_resume_the_trajectory(backend):
    x, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)

    def train(bm, optimizer, steps):
        for _ in range(steps):
            (bm.base(x) - y).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()

    ours, _ = twins(torch.float64)
    frozen = {k: v.clone() for k, v in ours.state_dict().items() if k.startswith("base.")}
    optimizer = VariationalAdam(ours, lr=1e-2, kl_weight=1e-3)
    train(ours, optimizer, 3)

    # The model's state dict keeps zuko's keys and the frozen weights, not the samples.
    # Copies, as torch.save would write them: the state dicts share the live tensors.
    model_state = copy.deepcopy(ours.state_dict())
    for key, value in frozen.items():
        assert torch.equal(model_state[key], value), key
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    generator_state = torch.get_rng_state()  # the next keys come from it, as dropout's masks
    train(ours, optimizer, 3)
    expected = {k: v.clone() for k, v in ours.state_dict().items()}

    resumed, _ = twins(torch.float64)
    resumed.load_state_dict(model_state)
    resumed_optimizer = VariationalAdam(resumed, lr=1e-2, kl_weight=1e-3)
    resumed_optimizer.load_state_dict(optimizer_state)
    torch.set_rng_state(generator_state)
    train(resumed, resumed_optimizer, 3)

    for key, value in resumed.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)


def snapshot(bm, optimizer):
    r"""Copies of everything a load could change: the posterior, the optimizer's state dict
    (the groups' hyperparameters, the moments, the samples, the keys, the step counts) and the
    samples in the base model."""

    return (
        copy.deepcopy(bm.state_dict()),
        copy.deepcopy(optimizer.state_dict()),
        [p.detach().clone() for p in bm.base.parameters()],
    )


def assert_same(a, b):
    for x, y in zip(a, b, strict=True):
        if isinstance(x, dict):
            assert_same(list(x.values()), list(y.values()))
        elif isinstance(x, (list, tuple)):
            assert_same(x, y)
        elif isinstance(x, torch.Tensor):
            assert torch.equal(x, y)
        else:
            assert x == y


def trained(backend, seed=0, hidden=16, steps=2):
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(3, hidden), nn.Tanh(), nn.Linear(hidden, 2))
    bm = fastbnf.BayesianModel(base, init_logvar=-4.0, exclude_params=["2.bias"])
    optimizer = VariationalAdam(bm, lr=1e-2, kl_weight=1e-3)
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    for _ in range(steps):
        (bm.base(x) - y).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return bm, optimizer


@pytest.mark.parametrize("misfit", ["another model", "truncated sample", "no posterior", "key"])
def test_a_bad_optimizer_state_dict_changes_nothing(backend, misfit):
    r"""Everything is checked before anything is loaded: the optimizer is left as it was (its
    learning rate too, which the bad state dict would change), and it still steps."""

    bm, optimizer = trained(backend)
    if misfit == "another model":
        state = trained(backend, seed=1, hidden=8)[1].state_dict()
    else:
        state = copy.deepcopy(optimizer.state_dict())
        if misfit == "truncated sample":
            state["posterior"]["theta"][0] = state["posterior"]["theta"][0][:-3]
        elif misfit == "no posterior":
            del state["posterior"]
        else:
            state["posterior"]["rng_state"][0] = state["posterior"]["rng_state"][0].float()
    for group in state["param_groups"]:
        group["lr"] = 123.0
    before = snapshot(bm, optimizer)

    with pytest.raises(ValueError, match="VariationalAdam.load_state_dict: .*nothing was loaded"):
        optimizer.load_state_dict(state)

    assert_same(snapshot(bm, optimizer), before)
    assert all(group["lr"] == 1e-2 for group in optimizer.param_groups)
    (bm.base(torch.randn(4, 3)).sum()).backward()
    optimizer.step()


def test_a_sparse_gradient_is_refused_before_any_update(backend):
    torch.manual_seed(0)
    base = nn.ModuleDict({"embed": nn.Embedding(10, 3, sparse=True), "head": nn.Linear(3, 2)})
    bm = fastbnf.BayesianModel(base, init_logvar=-4.0, include_params=["head"])
    optimizer = VariationalAdam(bm, lr=1e-2)
    base["head"](base["embed"](torch.tensor([1, 2, 3]))).sum().backward()
    assert base["embed"].weight.grad.is_sparse
    before = snapshot(bm, optimizer)

    with pytest.raises(RuntimeError, match="does not support sparse gradients.*nothing was"):
        optimizer.step()

    assert_same(snapshot(bm, optimizer), before)


def test_loading_the_model_redraws_the_held_sample(backend):
    r"""bm.load_state_dict() while the optimizer keeps its sample in the base model: the sample
    comes from the loaded posterior, not from the one before."""

    bm, optimizer = trained(backend)
    checkpoint = copy.deepcopy(bm.state_dict())
    for key in checkpoint:
        if key.startswith("means."):
            checkpoint[key] += 10.0  # a posterior far from the one the sample was drawn from
    bm.load_state_dict(checkpoint)

    (group,) = bm._posterior.groups()
    for name, mean, logvar in zip(group.names, group.means, group.logvars):
        sample = bm.base.get_parameter(name)
        sigma = fastbnf.reference.softclip(logvar).div(2).exp()
        assert ((sample - mean) / sigma).abs().max() < 6, name
    # The next step uses the new sample's key: its gradients are of the new sample.
    (bm.base(torch.randn(4, 3)).sum()).backward()
    optimizer.step()


def test_num_data_is_a_kl_weight_of_one_over_n(backend):
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    results = []
    for kwargs in ({"num_data": 250}, {"kl_weight": 1 / 250}):
        torch.manual_seed(0)
        bm = fastbnf.BayesianModel(nn.Linear(3, 2), init_logvar=-4.0)
        optimizer = VariationalAdam(bm, lr=1e-2, **kwargs)
        for _ in range(3):
            (bm.base(x) - y).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        results.append(torch.cat([t.detach().reshape(-1) for t in bm.parameters()]))
    assert torch.equal(*results)

    bm = fastbnf.BayesianModel(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="kl_weight or num_data .* not both"):
        VariationalAdam(bm, kl_weight=0.1, num_data=10)
    with pytest.raises(ValueError, match="num_data must be a positive integer, got 0"):
        VariationalAdam(bm, num_data=0)


def test_the_base_model_holds_samples_until_released(backend):
    ours, _ = twins(torch.float64)
    frozen = [p.detach().clone() for p in ours.base.parameters()]
    optimizer = VariationalAdam(ours)

    held = list(ours.base.parameters())
    assert all(p.requires_grad for p in held)
    assert not any(torch.equal(p, f) for p, f in zip(held, frozen))
    # Nothing else sees the samples: the KL's prior "init", a copy, the state dict.
    duplicate = copy.deepcopy(ours)
    for p, f in zip(duplicate.base.parameters(), frozen):
        assert torch.equal(p, f) and not p.requires_grad
    with pytest.raises(RuntimeError, match="cannot move or convert"):
        ours.float()
    with pytest.raises(RuntimeError, match="holds samples already"):
        VariationalAdam(ours)

    optimizer.release()
    for p, f in zip(ours.base.parameters(), frozen):
        assert torch.equal(p, f) and not p.requires_grad
    with pytest.raises(RuntimeError, match="released"):
        optimizer.step()


def test_accumulated_gradients_belong_to_one_sample(backend):
    r"""Two backward passes before a step equal one of the summed loss, in the flat buffers
    (``optimizer.zero_grad()``) and in the gradients autograd makes anew after they were freed
    by hand (``bm.zero_grad()``)."""

    x1, x2 = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)

    def loss(bm, x):
        return bm.base(x).square().mean()

    results = []
    for accumulate in (True, False):
        ours, _ = twins(torch.float64)
        torch.manual_seed(1)
        optimizer = VariationalAdam(ours, lr=1e-2, kl_weight=1e-3)
        for second in (False, True):
            if second and accumulate:
                ours.zero_grad()  # nn.Module's: the samples' .grad become None
            else:
                optimizer.zero_grad()
            if accumulate:
                loss(ours, x1).backward()
                loss(ours, x2).backward()
            else:
                (loss(ours, x1) + loss(ours, x2)).backward()
            torch.manual_seed(2)
            optimizer.step()
        results.append(torch.cat([p.detach().reshape(-1) for p in ours.parameters()]))

    torch.testing.assert_close(results[0], results[1], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lr=-1.0), "lr"),
        (dict(betas=(0.9, 1.0)), "betas"),
        (dict(betas=0.9), "betas"),
        (dict(eps=float("nan")), "eps"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(kl_weight=True), "kl_weight"),
        (dict(prior_var=0.0), "prior_var"),
    ],
)
def test_bad_optimizer_arguments(backend, kwargs, match):
    ours, _ = twins(torch.float64)
    before = [p.detach().clone() for p in ours.base.parameters()]
    with pytest.raises(ValueError, match=match):
        VariationalAdam(ours, **kwargs)
    assert ours._slots.held is None
    for p, b in zip(ours.base.parameters(), before):
        assert torch.equal(p, b)


@pytest.mark.cuda
@pytest.mark.skipif(
    not (torch.cuda.is_available() and has_kernel("cuda")),
    reason="no CUDA GPU and kernel",
)
def test_optimizer_on_cuda_equals_zukos_loop():
    ours, theirs = twins(torch.float64)
    ours, theirs = ours.cuda(), theirs.cuda()
    x = torch.randn(32, 3, dtype=torch.float64, device="cuda")
    y = torch.randn(32, 2, dtype=torch.float64, device="cuda")
    optimizer = VariationalAdam(ours, lr=1e-2, kl_weight=1e-2)
    reference = torch.optim.Adam(theirs.parameters(), lr=1e-2, foreach=False)

    for _ in range(10):
        draws = iter(held_noise(ours, optimizer))
        (ours.base(x) - y).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()

        with zuko_draws(lambda t: next(draws)):
            kl = theirs.kl_divergence()
            with theirs.reparameterize() as model:
                loss = (model(x) - y).square().mean() + 1e-2 * kl
            loss.backward()
        reference.step()
        reference.zero_grad()

    for key in theirs.means:
        torch.testing.assert_close(ours.means[key], theirs.means[key], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(ours.logvars[key], theirs.logvars[key], rtol=1e-9, atol=1e-12)


def capturable_run(device, capturable, steps=4):
    r"""A trained model with a non-Bayesian parameter, its optimizer, and its state dict taken
    mid-way and at the end."""

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    bm = fastbnf.BayesianModel(base.to(device), init_logvar=-4.0, exclude_params=["2.bias"])
    optimizer = VariationalAdam(bm, lr=1e-2, kl_weight=1e-3, capturable=capturable)
    x = torch.randn(8, 3, device=device)
    y = torch.randn(8, 2, device=device)
    for _ in range(steps):
        optimizer.zero_grad()
        (bm.base(x) - y).square().mean().backward()
        optimizer.step()
    return bm, optimizer


def test_a_capturable_step_is_the_eager_step(backend):
    r"""On the CPU, capturable=True keeps the counts as tensors and the keys in place, and takes
    the same steps."""

    eager_bm, eager = capturable_run("cpu", False)
    bm, optimizer = capturable_run("cpu", True)
    assert_same(snapshot(bm, optimizer), snapshot(eager_bm, eager))
    key = optimizer._rng_states[0]
    assert torch.equal(optimizer._step_tensors[0], torch.tensor(4))
    # A resumed optimizer takes the counts and keys into its own tensors, in place.
    state = copy.deepcopy(optimizer.state_dict())
    assert state["posterior"]["step"] == [4]
    optimizer.step()
    assert optimizer._rng_states[0] is key and optimizer._step_counts() == [5]
    optimizer.load_state_dict(state)
    assert optimizer._rng_states[0] is key and int(optimizer._step_tensors[0]) == 4
    assert torch.equal(key, state["posterior"]["rng_state"][0])

    fresh, _ = twins(torch.float64)
    with pytest.raises(TypeError, match="capturable must be a bool, got 1"):
        VariationalAdam(fresh, capturable=1)
    assert fresh._slots.held is None


def test_the_step_tensor_is_the_step(backend):
    ours, _ = twins(torch.float64)
    (group,) = ours._posterior.groups()
    runs = []
    for count in (None, torch.tensor(3)):
        means = [m.detach().clone() for m in group.means]
        logvars = [v.detach().clone() for v in group.logvars]
        exp_avgs, exp_avg_sqs = flat_moments(means)
        exp_avgs.fill_(0.1)
        exp_avg_sqs.fill_(0.2)
        torch.manual_seed(5)
        with torch.no_grad():
            theta, _, rng_state = ops.sample(means, logvars)
        next_state = variational_adam_step(
            torch.sin(theta), means, logvars, exp_avgs, exp_avg_sqs, theta, rng_state,
            3 if count is None else 1, lr=0.1, step_tensor=count,
        )  # fmt: skip
        runs.append([*means, *logvars, exp_avgs, exp_avg_sqs, theta, next_state])
    for a, b in zip(*runs):
        assert torch.equal(a, b)

    args = (theta, group.means, group.logvars, exp_avgs, exp_avg_sqs, theta, rng_state, 1)
    for bad, shape in ((torch.tensor([1, 2]), r"\(2,\)"), (torch.tensor(1.0), r"\(\)")):
        with pytest.raises(
            ValueError, match=rf"step_tensor must be an int64 tensor of one .*{shape}"
        ):
            variational_adam_step(*args, step_tensor=bad)
    with pytest.raises(ValueError, match="exclude average"):
        variational_adam_step(*args, step_tensor=torch.tensor(1), average=lambda flat: None)


@pytest.mark.cuda
@pytest.mark.skipif(
    not (torch.cuda.is_available() and has_kernel("cuda")),
    reason="no CUDA GPU and kernel",
)
def test_a_whole_training_step_replays_as_a_cuda_graph():
    r"""Forward, backward and ``optimizer.step()`` captured in one CUDA graph: its replays take
    the steps that eager capturable steps take from the same state and generator."""

    def setup():
        torch.manual_seed(0)
        torch.cuda.manual_seed(0)
        base = nn.Sequential(nn.Linear(3, 64), nn.Tanh(), nn.Linear(64, 2)).cuda()
        bm = fastbnf.BayesianModel(base, init_logvar=-4.0, exclude_params=["2.bias"])
        optimizer = VariationalAdam(bm, lr=1e-2, kl_weight=1e-3, capturable=True)
        return bm, optimizer

    x = torch.randn(32, 3, device="cuda")
    y = torch.randn(32, 2, device="cuda")

    def train_step(bm, optimizer):
        optimizer.zero_grad(set_to_none=False)  # in the graph: the buffers, zeroed each replay
        (bm.base(x) - y).square().mean().backward()
        optimizer.step()

    bm, optimizer = setup()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: the state, autograd's buffers
        for _ in range(3):
            train_step(bm, optimizer)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        train_step(bm, optimizer)
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()

    eager_bm, eager = setup()
    for _ in range(3 + 5):
        train_step(eager_bm, eager)
    assert optimizer._step_counts() == eager._step_counts() == [8]
    # The same kernels in the same order; cuBLAS may pick other algorithms under capture.
    for a, b in zip(snapshot(bm, optimizer)[0].values(), snapshot(eager_bm, eager)[0].values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_compiled_step_of_the_plain_loop(backend):
    r"""The base model holds plain leaves: its forward and backward compile whole, and the
    compiled loop trains as the eager one does."""

    x, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    results = []
    for compiled in (False, True):
        ours, _ = twins(torch.float64)
        torch.manual_seed(1)
        optimizer = VariationalAdam(ours, lr=1e-2, kl_weight=1e-3)

        def loss_fn():
            return (ours.base(x) - y).square().mean()

        fn = torch.compile(loss_fn, fullgraph=True, backend="aot_eager") if compiled else loss_fn
        for _ in range(3):
            fn().backward()
            optimizer.step()
            optimizer.zero_grad()
        results.append(torch.cat([p.detach().reshape(-1) for p in ours.parameters()]))

    torch.testing.assert_close(results[1], results[0], rtol=1e-12, atol=1e-14)
