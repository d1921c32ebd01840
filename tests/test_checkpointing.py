r"""Activation checkpointing inside and after reparameterize() contexts."""

import copy
import io
import pytest
import torch
import torch.nn as nn
import torch.utils.checkpoint

import fastbnf
import fastbnf.checkpointing
import fastbnf.model.checkpointing

from fastbnf.checkpointing import checkpoint, context_fn


def model(**kwargs):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 16), nn.LayerNorm(16), nn.Linear(16, 2)
    )
    return fastbnf.BayesianModel(net, init_logvar=-3.0, **kwargs)


def grads(bm):
    out = [p.grad.clone() for p in [*bm.means.values(), *bm.logvars.values()]]
    bm.zero_grad()
    return out


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


def plain(m, x):
    return m(x).square().sum()


def reference(bm, x, seed, local_trick=False):
    torch.manual_seed(seed)
    with bm.reparameterize(local_trick=local_trick) as m:
        plain(m, x).backward()
    return grads(bm)


@pytest.mark.parametrize("local_trick", [False, True])
def test_torch_checkpoint_with_backward_inside_the_context(backend, local_trick):
    bm = model()
    x = torch.randn(8, 3)
    expected = reference(bm, x, seed=1, local_trick=local_trick)

    torch.manual_seed(1)
    with bm.reparameterize(local_trick=local_trick) as m:
        h = torch.utils.checkpoint.checkpoint(m[:4], x, use_reentrant=False)
        m[4](h).square().sum().backward()

    assert_same(grads(bm), expected)


def test_reentrant_checkpoint_inside_the_context(backend):
    bm = model()
    # The reentrant variant only differentiates a region whose inputs require grad.
    x = torch.randn(8, 3, requires_grad=True)
    expected = reference(bm, x, seed=1)

    # The whole sampled group inside one region: its nested backward is the only one that
    # reaches the sample op.
    torch.manual_seed(1)
    with bm.reparameterize() as m:
        torch.utils.checkpoint.checkpoint(m, x, use_reentrant=True).square().sum().backward()
    assert_same(grads(bm), expected)

    # Part of the group outside the region: the nested backward and the outer one both reach
    # the group's one sample op, each with the gradients of its own samples. The op keeps no
    # saved tensor that the first frees, and its gradients are linear in the samples': the two
    # add up to the whole step's.
    bm.zero_grad()
    torch.manual_seed(1)
    with bm.reparameterize() as m:
        h = torch.utils.checkpoint.checkpoint(m[:4], x, use_reentrant=True)
        m[4](h).square().sum().backward()
    assert_same(grads(bm), expected)


@pytest.mark.parametrize("local_trick", [False, True])
def test_fastbnf_checkpoint_with_backward_after_the_context(backend, local_trick):
    bm = model()
    x = torch.randn(8, 3)
    expected = reference(bm, x, seed=2, local_trick=local_trick)

    torch.manual_seed(2)
    with bm.reparameterize(local_trick=local_trick) as m:
        loss = m[4](checkpoint(m[:4], x)).square().sum()
    loss.backward()

    assert_same(grads(bm), expected)
    # The recomputation put everything back: the base model holds its own parameters.
    for name, param in bm.base.named_parameters():
        assert isinstance(param, nn.Parameter) and not param.requires_grad, name
    assert "forward" not in bm.base[0].__dict__


def test_bm_call_as_under_ddp(backend):
    # bm(fn, ...) is what DistributedDataParallel calls: backward always runs after it.
    bm = model()
    x = torch.randn(8, 3)
    expected = reference(bm, x, seed=3)

    torch.manual_seed(3)
    bm(lambda m, x: checkpoint(m, x).square().sum(), x).backward()
    assert_same(grads(bm), expected)

    # torch.utils.checkpoint with the context_fn does the same.
    torch.manual_seed(3)
    bm(
        lambda m, x: (
            torch.utils.checkpoint.checkpoint(m, x, use_reentrant=False, context_fn=context_fn)
            .square()
            .sum()
        ),
        x,
    ).backward()
    assert_same(grads(bm), expected)


def test_each_region_recomputes_with_its_own_samples(backend):
    # Gradient accumulation: two contexts (two samples) before one backward.
    bm = model()
    x = torch.randn(8, 3)

    torch.manual_seed(4)
    expected = [a + b for a, b in zip(reference(bm, x, seed=4), reference(bm, x, seed=5))]

    losses = []
    for seed in (4, 5):
        torch.manual_seed(seed)
        losses.append(bm(lambda m, x: checkpoint(m, x).square().sum(), x))
    sum(losses).backward()

    assert_same(grads(bm), expected)


def test_composes_with_another_context_fn(backend):
    bm = model()
    x = torch.randn(8, 3)
    entered = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __enter__(self):
            entered.append(self.name)

        def __exit__(self, *exc):
            return False

    def inner():
        return Recorder("forward"), Recorder("recompute")

    expected = reference(bm, x, seed=6)
    torch.manual_seed(6)
    bm(lambda m, x: checkpoint(m, x, context_fn=inner).square().sum(), x).backward()

    assert_same(grads(bm), expected)
    assert entered == ["forward", "recompute"]


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_plain_checkpoint_after_the_context_is_an_error(use_reentrant):
    bm = model()
    x = torch.randn(8, 3, requires_grad=True)

    def fn(m, x):
        return torch.utils.checkpoint.checkpoint(m, x, use_reentrant=use_reentrant).square().sum()

    loss = bm(fn, x)
    with pytest.raises(RuntimeError, match=r"context had closed.*fastbnf\.checkpointing"):
        loss.backward()


def test_no_false_alarm_outside_backward():
    bm = model()
    x = torch.randn(8, 3)
    bm(plain, x).backward()  # arms the sentinels

    # The base model, a sampled copy and a saved model all work as usual.
    assert bm.base(x).shape == (8, 2)
    sampled = bm.sample_model()
    sampled(x).sum().backward()
    assert copy.deepcopy(bm.base)(x).shape == (8, 2)

    buffer = io.BytesIO()
    torch.save(bm, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.base(x).shape == (8, 2)

    # A context closed without autograd leaves nothing to recompute, so nothing is armed.
    fastbnf.checkpointing.disarm(bm)
    with torch.no_grad():
        bm(plain, x)  # exits without autograd: nothing to arm
    assert all(fastbnf.model.checkpointing._KEY not in m._forward_pre_hooks for m in bm.base)


def test_sentinels_come_off_on_the_next_context():
    bm = model()
    x = torch.randn(8, 3)
    bm(plain, x)
    assert fastbnf.model.checkpointing._KEY in bm.base[0]._forward_pre_hooks

    with bm.reparameterize() as m:
        assert fastbnf.model.checkpointing._KEY not in bm.base[0]._forward_pre_hooks
        # Backward inside the context: the plain checkpoint is fine.
        torch.utils.checkpoint.checkpoint(m, x, use_reentrant=False).sum().backward()


def test_disarm_allows_checkpointing_the_bare_base_model():
    # Between contexts the sentinels cannot tell a recomputation of the bare base model from
    # one of a closed context; disarm() says it is the former.
    bm = model()
    x = torch.randn(8, 3, requires_grad=True)
    bm(plain, x)

    fastbnf.checkpointing.disarm(bm)
    torch.utils.checkpoint.checkpoint(bm.base, x, use_reentrant=False).sum().backward()
    assert x.grad is not None


def test_reentrant_is_refused():
    bm = model()
    with bm.reparameterize() as m:
        with pytest.raises(ValueError, match="use_reentrant"):
            checkpoint(m, torch.randn(2, 3), use_reentrant=True)
