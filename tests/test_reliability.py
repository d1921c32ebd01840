r"""Defects found by using the model as a new user would, each with the test that found it:
threads, sampled copies, a base model changed after wrapping, flags of the wrong type, and
forwards of the base model inside an unrelated backward."""

import io
import pickle
import threading

import pytest
import torch
import torch.nn as nn

import fastbnf

from fastbnf.optim import VariationalAdam


def make_model():
    torch.manual_seed(0)
    return fastbnf.BayesianModel(
        nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)), init_logvar=-4.0
    )


def a_training_step(bm):
    r"""The tutorial's step: the context closes before the backward, which arms the
    activation-checkpointing sentinels on the base model's modules."""

    with bm.reparameterize(return_kl=True) as (model, kl):
        loss = model(torch.randn(4, 3)).square().mean() + 1e-3 * kl
    loss.backward()


def test_a_context_in_another_thread_is_refused_and_the_weights_stay(backend):
    bm = make_model()
    frozen = [p for p in bm.base.parameters()]
    inside, leave = threading.Event(), threading.Event()

    def hold_a_context():
        with bm.reparameterize():
            inside.set()
            leave.wait(10)

    thread = threading.Thread(target=hold_a_context)
    thread.start()
    inside.wait(10)
    try:
        with pytest.raises(RuntimeError, match=r"already active .* \(in this thread or another\)"):
            with bm.reparameterize():
                pass
    finally:
        leave.set()
        thread.join()
    assert [p for p in bm.base.parameters()] == frozen


def test_racing_contexts_always_restore_the_frozen_weights(backend):
    bm = make_model()
    frozen = [p for p in bm.base.parameters()]
    errors, unexpected = [], []

    def contexts():
        for _ in range(200):
            try:
                with bm.reparameterize() as model:
                    model(torch.randn(2, 3))
            except RuntimeError as error:
                (errors if "already active" in str(error) else unexpected).append(error)

    threads = [threading.Thread(target=contexts) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert unexpected == []
    assert [p for p in bm.base.parameters()] == frozen
    assert not any(p.requires_grad for p in bm.base.parameters())


def test_a_sampled_model_is_plain_after_training(backend):
    bm = make_model()
    a_training_step(bm)
    sampled = bm.sample_model()

    assert all(len(m._forward_pre_hooks) == 0 for m in sampled.modules())
    scripted = torch.jit.script(sampled)
    x = torch.randn(5, 3)
    torch.testing.assert_close(scripted(x), sampled(x))
    # Saved, it loads without fastbnf: nothing of fastbnf's in the pickle.
    buffer = io.BytesIO()
    torch.save(sampled, buffer)
    assert b"fastbnf" not in buffer.getvalue()
    assert b"fastbnf" not in pickle.dumps(sampled)


def test_a_layer_replaced_after_wrapping_is_refused(backend):
    bm = make_model()
    bm.base.add_module("extra", nn.Identity())  # a new module, no slot's: fine
    with bm.reparameterize():
        pass

    bm.base[0] = nn.Linear(3, 8)
    with pytest.raises(RuntimeError, match=r"'0\.weight' was replaced .* new BayesianModel"):
        with bm.reparameterize():
            pass
    with pytest.raises(RuntimeError, match=r"'0\.weight' was replaced"):
        VariationalAdam(bm)
    # Nothing was swapped in: the new layer keeps its own weights.
    assert bm.base[0].weight.requires_grad


@pytest.mark.parametrize("flag", ["return_kl", "local_trick"])
def test_a_flag_that_is_not_a_bool_is_one_error_on_every_backend(backend, flag):
    bm = make_model()
    with pytest.raises(ValueError, match=f"{flag} must be True or False, got 'yes'"):
        with bm.reparameterize(**{flag: "yes"}):
            pass
    with bm.reparameterize():  # nothing was left active
        pass


def test_a_no_grad_forward_in_an_unrelated_backward_is_not_a_recomputation(backend):
    bm = make_model()
    a_training_step(bm)  # the sentinels are armed
    seen = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            with torch.no_grad():
                seen.append(bm.base(torch.randn(2, 3)))
            return grad * 2

    x = torch.randn(3, requires_grad=True)
    Probe.apply(x).sum().backward()
    assert len(seen) == 1 and torch.equal(x.grad, torch.full((3,), 2.0))
