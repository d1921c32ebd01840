r"""Whole training steps under :func:`torch.compile`: one graph, the eager results."""

import pytest
import torch

from zuko.nn import MLP

import fastbnf

from fastbnf._backend import has_kernel


@pytest.mark.parametrize("style", ["seed", "fused"])
def test_compiled_step_is_one_graph_with_the_eager_results(backend, style):
    r"""The tutorial's step (``kl_divergence()`` then ``reparameterize()``) and the fused one
    (``return_kl=True``) compile with ``fullgraph=True``, which fails on any graph break, and
    give the eager loss and gradients for the same seed."""

    check_compiled_step(style, "cpu")


@pytest.mark.cuda
@pytest.mark.skipif(
    not (torch.cuda.is_available() and has_kernel("cuda")), reason="no CUDA GPU and kernel"
)
@pytest.mark.parametrize("style", ["seed", "fused"])
def test_compiled_step_on_cuda(style):
    check_compiled_step(style, "cuda")


def check_compiled_step(style, device):
    torch.manual_seed(0)
    base = MLP(5, 5, hidden_features=(16, 16)).to(device)
    bm = fastbnf.BayesianModel(base, init_logvar=-3.0)
    x, y = torch.randn(8, 5, device=device), torch.randn(8, 5, device=device)

    def step(x, y):
        if style == "seed":
            kl = bm.kl_divergence(prior_var=0.5)
            with bm.reparameterize() as model:
                loss = (model(x) - y).square().mean()
        else:
            with bm.reparameterize(return_kl=True, prior_var=0.5) as (model, kl):
                loss = (model(x) - y).square().mean()
        return loss + 1e-3 * kl

    def run(fn):
        bm.zero_grad()
        torch.manual_seed(1)  # seeds the CUDA generators too
        loss = fn(x, y)
        loss.backward()
        return loss.detach(), {
            k: p.grad.clone() for k, p in bm.named_parameters() if p.requires_grad
        }

    eager_loss, eager_grads = run(step)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for _ in range(2):  # the first call compiles, the second runs the compiled graph
        loss, grads = run(compiled)
        torch.testing.assert_close(loss, eager_loss)
        assert grads.keys() == eager_grads.keys()
        for key, grad in grads.items():
            torch.testing.assert_close(grad, eager_grads[key], msg=key)
    assert not bm._slots.active  # the context closed in the compiled code too
