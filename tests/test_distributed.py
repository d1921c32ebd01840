r"""Data-parallel training: DistributedDataParallel(bm) over two gloo processes."""

import os
import pytest
import ranks
import torch
import torch.distributed as dist
import torch.nn as nn

from pathlib import Path

import fastbnf

STEPS = 3
WORLD = ranks.WORLD

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing")


def gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    tensors = [torch.empty_like(tensor) for _ in range(WORLD)]
    dist.all_gather(tensors, tensor.contiguous())
    return tensors


def flat_grads(bm) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in bm.parameters() if p.requires_grad])


def loss_fn(module, x, y):
    return (module(x) - y).square().mean()


def train(rank: int, init_file: str, backend: str) -> None:
    if backend:
        os.environ["FASTBNF_BACKEND"] = backend
    else:
        os.environ.pop("FASTBNF_BACKEND", None)

    ranks.init(rank, init_file)

    # The same seed on every rank: same model, and (without rank folding) the same noise.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))
    bm = fastbnf.BayesianModel(net, init_logvar=-4.0)
    ddp = nn.parallel.DistributedDataParallel(bm)
    optimizer = torch.optim.Adam(ddp.parameters(), lr=1e-2)

    # Each rank its own data.
    data = torch.Generator().manual_seed(100 + rank)

    for step in range(STEPS):
        x = torch.randn(8, 4, generator=data)
        y = x[:, :2].sin()

        # Per-rank gradient without synchronization, then the same step synchronized.
        with torch.random.fork_rng():
            torch.manual_seed(step)
            with ddp.no_sync():
                loss = ddp(loss_fn, x, y) + 1e-3 * bm.kl_divergence()
                loss.backward()
            local = flat_grads(bm)
            optimizer.zero_grad()

            torch.manual_seed(step)
            loss = ddp(loss_fn, x, y) + 1e-3 * bm.kl_divergence()
            loss.backward()
            synced = flat_grads(bm)

        # DDP averages: the synchronized gradient is the mean of the per-rank ones.
        locals_ = gather(local)
        assert not torch.allclose(locals_[0], locals_[1])
        torch.testing.assert_close(synced, sum(locals_) / WORLD, rtol=1e-5, atol=1e-7)
        # Every rank holds the same synchronized gradient, bit for bit.
        synceds = gather(synced)
        assert torch.equal(synceds[0], synceds[1])

        optimizer.step()
        optimizer.zero_grad()

    # After training the replicas are bitwise identical.
    params = torch.cat([p.detach().reshape(-1) for p in bm.parameters()])
    everyone = gather(params)
    assert torch.equal(everyone[0], everyone[1])
    assert not torch.equal(bm.means["0-weight"], net[0].weight)  # it did train

    # Same seed, different ranks: different noise (the rank is folded into the key).
    torch.manual_seed(7)
    eps = {k: (v - bm.means[k.replace(".", "-")]) for k, v in bm.sample_params().items()}
    flat_eps = torch.cat([e.detach().reshape(-1) for e in eps.values()])
    drawn = gather(flat_eps)
    assert not torch.allclose(drawn[0], drawn[1])

    # With fold_rank=False the ranks draw alike.
    bm.fold_rank = False
    torch.manual_seed(7)
    same = torch.cat([v.detach().reshape(-1) for v in bm.sample_params().values()])
    drawn = gather(same)
    assert torch.equal(drawn[0], drawn[1])

    dist.barrier()


@pytest.mark.parametrize("backend", ["", "torch"], ids=["default", "torch"])
def test_ddp_two_ranks(tmp_path: Path, backend: str):
    ranks.run(
        train, str(tmp_path / "init"), backend, preload=("torch", "torch._dynamo", "fastbnf")
    )
