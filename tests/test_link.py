r"""Tests of the seed-style link (:class:`fastbnf.ops.Link`): ``kl_divergence()`` then
``reparameterize()`` computes the gradients of both in the KL's backward, one kernel call.

The reference is the same step with the link broken: the sample drawn first, then the KL (no
link, two backward calls), with the same random state, hence the same noise.
"""

import pytest
import torch
import torch.nn as nn

import fastbnf

from fastbnf.ops.library import OP_NAMES


def is_op_call(name):
    r"""A call of an op or its kernel, not of the extension's helpers (views_like, ...)."""

    return name.startswith("fastbnf::") and name[9:].removesuffix("_kernel") in OP_NAMES


def make_model(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(3, 5), nn.ELU(), nn.Linear(5, 2)).to(dtype)
    return fastbnf.BayesianModel(base, init_logvar=-3.0)


def loss_of(net, x):
    return net(x).square().sum()


def grads_of(bm):
    return [p.grad.clone() for p in bm.parameters() if p.requires_grad]


def reference_grads(x, with_kl=True, seed=1, prior_var=1.0):
    r"""Sample first, KL second: no link."""

    bm = make_model()
    torch.manual_seed(seed)
    with bm.reparameterize() as net:
        loss = loss_of(net, x)
    if with_kl:
        loss = loss + bm.kl_divergence(prior_var=prior_var)
    loss.backward()
    return grads_of(bm)


def linked_step(x):
    r"""A model and its seed-style total (KL first, then the sample), before any backward."""

    bm = make_model()
    kl = bm.kl_divergence()
    torch.manual_seed(1)
    with bm.reparameterize() as net:
        total = loss_of(net, x) + kl
    return bm, total


def assert_grads_close(got, expected):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_linked_step_matches_unlinked(backend):
    x = torch.randn(4, 3, dtype=torch.float64)
    bm, total = linked_step(x)
    total.backward()
    assert_grads_close(grads_of(bm), reference_grads(x))


def test_linked_step_with_a_prior(backend):
    x = torch.randn(4, 3, dtype=torch.float64)
    bm = make_model()
    kl = bm.kl_divergence(prior_var=0.5)
    torch.manual_seed(1)
    with bm.reparameterize() as net:
        (loss_of(net, x) + kl).backward()
    assert_grads_close(grads_of(bm), reference_grads(x, prior_var=0.5))


def test_one_backward_call(backend):
    bm = make_model()
    with torch.profiler.profile() as prof:
        kl = bm.kl_divergence()
        with bm.reparameterize() as net:
            (loss_of(net, torch.randn(2, 3, dtype=torch.float64)) + kl).backward()
    names = [e.name for e in prof.events() if is_op_call(e.name)]
    assert names.count("fastbnf::sample_backward") == 1
    assert not any(n.startswith("fastbnf::kl_backward") for n in names)


def test_loss_without_the_kl(backend):
    x = torch.randn(4, 3, dtype=torch.float64)
    bm = make_model()
    bm.kl_divergence()
    torch.manual_seed(1)
    with bm.reparameterize() as net:
        loss_of(net, x).backward()
    assert_grads_close(grads_of(bm), reference_grads(x, with_kl=False))


def test_kl_backward_first_then_the_loss(backend):
    x = torch.randn(4, 3, dtype=torch.float64)
    bm = make_model()
    kl = bm.kl_divergence()
    torch.manual_seed(1)
    with bm.reparameterize() as net:
        loss = loss_of(net, x)
    kl.backward()  # frees the KL's saved tensors; the loss reaches its node again by the link
    loss.backward()
    assert_grads_close(grads_of(bm), reference_grads(x))


def test_retain_graph_accumulates(backend):
    x = torch.randn(4, 3, dtype=torch.float64)
    bm, total = linked_step(x)
    total.backward(retain_graph=True)
    total.backward()
    assert_grads_close(grads_of(bm), [2 * g for g in reference_grads(x)])


def test_autograd_grad(backend):
    x = torch.randn(4, 3, dtype=torch.float64)
    bm, total = linked_step(x)
    means = list(bm.means.values())
    got = torch.autograd.grad(total, means)
    assert_grads_close(list(got), reference_grads(x)[: len(means)])
    assert all(p.grad is None for p in bm.parameters())


def test_only_the_next_sample_is_linked(backend):
    bm = make_model()
    kl = bm.kl_divergence()
    with torch.profiler.profile() as prof:
        with bm.reparameterize() as net:
            first = loss_of(net, torch.randn(2, 3, dtype=torch.float64))
        with bm.reparameterize() as net:
            second = loss_of(net, torch.randn(2, 3, dtype=torch.float64))
        (first + second + kl).backward()
    names = [e.name for e in prof.events() if is_op_call(e.name)]
    # One linked backward (first + KL), one plain (second).
    assert names.count("fastbnf::sample_backward") == 2
    assert not any(n.startswith("fastbnf::kl_backward") for n in names)


def test_no_link_without_gradients(backend):
    bm = make_model()
    with torch.no_grad():
        bm.kl_divergence()
    assert bm._posterior.links is None
    kl = bm.kl_divergence()
    with torch.no_grad(), bm.reparameterize():
        pass  # a sample without gradients takes the links and drops them
    assert bm._posterior.links is None
    kl.backward()
    assert all(p.grad is not None for p in bm.means.values())


def test_stale_link_after_an_in_place_update(backend):
    x = torch.randn(4, 3, dtype=torch.float64)
    bm = make_model()
    kl = bm.kl_divergence()
    with torch.no_grad():
        for p in bm.parameters():
            p.add_(0.01)  # an optimizer step between the KL and the sample
    torch.manual_seed(1)
    with bm.reparameterize() as net:
        loss = loss_of(net, x)
    # The sample alone is fine: its backward reads the tensors it was drawn from.
    loss.backward(retain_graph=True)
    expected = make_model()
    with torch.no_grad():
        for p in expected.parameters():
            p.add_(0.01)
    torch.manual_seed(1)
    with expected.reparameterize() as net:
        loss_of(net, x).backward()
    assert_grads_close(grads_of(bm), grads_of(expected))
    # The stale KL is not: autograd's in-place check, as without the link.
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + kl).backward()


def test_groups_of_mixed_dtypes_are_linked_each(backend):
    def model():
        torch.manual_seed(0)
        return fastbnf.BayesianModel(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2).double()))

    def loss(net):
        h = net[0](torch.ones(2, 3))
        return net[1](h.double()).sum()

    bm = model()
    kl = bm.kl_divergence()
    torch.manual_seed(1)
    with bm.reparameterize() as net:
        (loss(net) + kl).backward()

    ref = model()
    torch.manual_seed(1)
    with ref.reparameterize() as net:
        total = loss(net)
    (total + ref.kl_divergence()).backward()
    for g, e in zip(grads_of(bm), grads_of(ref)):
        torch.testing.assert_close(g, e)


def test_links_do_not_survive_a_copy(backend):
    import copy

    bm = make_model()
    bm.kl_divergence()
    assert bm._posterior.links is not None
    assert copy.deepcopy(bm)._posterior.links is None
    bm.double()  # moving the parameters rebuilds the groups, and drops the links
    assert bm._posterior.links is None


def test_a_link_is_checked(backend):
    from fastbnf import ops

    means = [torch.randn(3, requires_grad=True), torch.randn(2, requires_grad=True)]
    logvars = [torch.randn(3, requires_grad=True), torch.randn(2, requires_grad=True)]
    link = ops.Link()
    with pytest.raises(ValueError, match="after a kl"):
        ops.sample(means, logvars, link=link)  # no KL made this link yet
    ops.kl(means, logvars, link=link)
    with pytest.raises(ValueError, match="other tensors"):
        ops.sample(means[:1], logvars[:1], link=link)
    with pytest.raises(ValueError, match="without with_kl"):
        ops.sample(means, logvars, with_kl=True, link=link)
    ops.sample(means, logvars, link=link)
    with pytest.raises(ValueError, match="taken by one sample"):
        ops.sample(means, logvars, link=link)


def test_several_samples_after_the_kl(backend):
    r"""``sample_params(n)`` right after ``kl_divergence()``: the link goes to a sample that
    cannot take it (n samples), and both gradients are still exact."""

    torch.manual_seed(0)
    bm = fastbnf.BayesianModel(nn.Linear(3, 2).double(), init_logvar=-4.0)
    kl = bm.kl_divergence()
    samples = bm.sample_params(n=3)
    (kl + sum(s.sum() for s in samples.values())).backward()

    for key, mean in bm.means.items():
        # d/dmu of the KL to N(0, 1) is mu; each of the 3 samples adds 1 per element.
        torch.testing.assert_close(mean.grad, mean.detach() + 3, msg=key)
