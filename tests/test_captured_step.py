r"""Whole training steps (forward, backward and Adam) captured in a CUDA graph.

A replay must draw fresh noise, as an eager step does, and replays must equal eager steps taken
from the same parameters, optimizer state and CUDA RNG state: the ops read their Philox offset
from the generator's graph-safe state, which each replay advances. Needs a GPU and the CUDA
kernels; skips without them.
"""

import pytest
import torch

from zuko.nn import MLP

import fastbnf
from fastbnf._backend import has_kernel

_CUDA = torch.cuda.is_available()

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not (_CUDA and has_kernel("cuda")), reason="no CUDA GPU and kernel"),
]


def _training(style: str):
    r"""A Bayesian MLP, its Adam (capturable, as CUDA graphs require) and one training step."""

    torch.manual_seed(0)
    bm = fastbnf.BayesianModel(MLP(5, 5, hidden_features=(32, 32)).cuda(), init_logvar=-3.0)
    optimizer = torch.optim.Adam(bm.parameters(), lr=1e-2, capturable=True)
    x, y = torch.randn(64, 5, device="cuda"), torch.randn(64, 5, device="cuda")

    def step() -> torch.Tensor:
        if style == "seed":
            kl = bm.kl_divergence(prior_var=0.5)
            with bm.reparameterize() as model:
                loss = (model(x) - y).square().mean() + 1e-3 * kl
        else:
            with bm.reparameterize(return_kl=True, prior_var=0.5) as (model, kl):
                loss = (model(x) - y).square().mean() + 1e-3 * kl
        loss.backward()
        optimizer.step()
        return loss.detach()

    return bm, optimizer, step


def _state(bm, optimizer) -> list[torch.Tensor]:
    r"""Every tensor a step changes: the posterior, its gradients and Adam's state."""

    params = [p for p in bm.parameters() if p.requires_grad]
    tensors = params + [p.grad for p in params if p.grad is not None]
    for state in optimizer.state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return tensors


@pytest.mark.parametrize("style", ["seed", "fused"])
def test_captured_step_draws_fresh_noise_and_equals_eager(style):
    bm, optimizer, step = _training(style)

    # Warm-up on a side stream (Adam makes its state), as torch.cuda.graphs asks.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            optimizer.zero_grad(set_to_none=False)
            step()
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=False)
    with torch.cuda.graph(graph):
        static_loss = step()

    tensors = _state(bm, optimizer)
    start = [t.clone() for t in tensors]

    def restore():
        with torch.no_grad():
            for t, s in zip(tensors, start):
                t.copy_(s)

    def replays(seed: int, count: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        restore()
        torch.cuda.manual_seed(seed)
        losses = []
        for _ in range(count):
            optimizer.zero_grad(set_to_none=False)  # outside the graph, as in eager steps
            graph.replay()
            losses.append(static_loss.clone())
        torch.cuda.synchronize()
        return losses, [t.clone() for t in tensors]

    losses, after = replays(seed=7, count=3)

    # Fresh noise on each replay: the same parameters give another loss with another offset.
    again, _ = replays(seed=7, count=1)
    other, _ = replays(seed=8, count=1)
    assert torch.equal(again[0], losses[0])
    assert not torch.equal(other[0], losses[0])

    # The eager steps from the same state and seed.
    restore()
    torch.cuda.manual_seed(7)
    eager_losses = []
    for _ in range(3):
        optimizer.zero_grad(set_to_none=False)
        eager_losses.append(step())
    torch.cuda.synchronize()

    for i, (loss, eager) in enumerate(zip(losses, eager_losses)):
        torch.testing.assert_close(loss, eager, msg=f"loss of step {i}")
    for i, (t, expected) in enumerate(zip(_state(bm, optimizer), after)):
        torch.testing.assert_close(t, expected, msg=f"state tensor {i} after 3 steps")
    assert len(losses) == 3 and not torch.equal(losses[1], losses[2])
