r"""VariationalAdam over two gloo processes against one process with the whole batch."""

import datetime
import multiprocessing
import os
import pytest
import sys
import time
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from pathlib import Path

import fastbnf

from fastbnf.optim import VariationalAdam

WORLD = 2
STEPS = 4

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing")


def batches(rank: int | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    r"""Rank ``rank``'s half of every step's batch, or the whole batches for ``None``."""

    data = torch.Generator().manual_seed(100)
    out = []
    for _ in range(STEPS):
        x = torch.randn(2 * 8, 4, generator=data, dtype=torch.float64)
        y = x[:, :2].sin()
        if rank is not None:
            x, y = x[rank * 8 : (rank + 1) * 8], y[rank * 8 : (rank + 1) * 8]
        out.append((x, y))
    return out


def train(rank: int | None, fold_rank: bool) -> torch.Tensor:
    r"""Trains the same model (same seed) on the rank's data; returns its posterior, flat."""

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2)).double()
    # The last bias is not Bayesian: the plain parameters are averaged too.
    bm = fastbnf.BayesianModel(
        net, init_logvar=-4.0, exclude_params=["2.bias"], fold_rank=fold_rank
    )
    optimizer = VariationalAdam(bm, lr=1e-2, kl_weight=1e-3)
    for x, y in batches(rank):
        (bm.base(x) - y).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    tensors = [*bm.means.values(), *bm.logvars.values(), net[2].bias]
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def worker(rank: int, init_file: str, out_dir: str) -> None:
    try:
        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo",
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=WORLD,
            timeout=datetime.timedelta(seconds=60),
        )
        for fold_rank in (False, True):
            torch.save(train(rank, fold_rank), f"{out_dir}/rank{rank}-fold{int(fold_rank)}.pt")
        dist.barrier()
    except BaseException:
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    # Without tearing the group down: gloo's destructor can deadlock at exit.
    sys.stdout.flush()
    os._exit(0)


START = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"


def test_two_ranks_equal_one_process_with_the_whole_batch(tmp_path: Path):
    if START == "forkserver":
        multiprocessing.set_forkserver_preload(["torch", "fastbnf"])
    args = (str(tmp_path / "init"), str(tmp_path))
    context = mp.start_processes(worker, args=args, nprocs=WORLD, join=False, start_method=START)
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the two ranks did not finish within 120 s")

    shared = [torch.load(tmp_path / f"rank{r}-fold0.pt") for r in range(WORLD)]
    folded = [torch.load(tmp_path / f"rank{r}-fold1.pt") for r in range(WORLD)]

    # Every rank ends with the same posterior (the same averaged gradients, the same update).
    assert torch.equal(shared[0], shared[1])
    assert torch.equal(folded[0], folded[1])

    # One sample for all ranks: the mean of the halves' losses is the whole batch's, and one
    # process draws the same keys from the same seed.
    alone = train(None, fold_rank=False)
    torch.testing.assert_close(shared[0], alone, rtol=1e-12, atol=1e-14)

    # Each rank its own noise: another trajectory.
    assert not torch.allclose(folded[0], shared[0])
