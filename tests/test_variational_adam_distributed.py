r"""VariationalAdam over two gloo processes against one process with the whole batch."""

import pytest
import ranks
import torch
import torch.distributed as dist
import torch.nn as nn

from pathlib import Path

import fastbnf

from fastbnf.optim import VariationalAdam

STEPS = 4
WORLD = ranks.WORLD

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


def train(
    rank: int | None, fold_rank: bool, ddp: bool = False, capturable: bool = False
) -> torch.Tensor:
    r"""Trains the same model (same seed) on the rank's data; returns its posterior, flat. With
    ``ddp``, the base model is wrapped in DistributedDataParallel after the optimizer is created
    (as trainers wrap it)."""

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2)).double()
    # The last bias is not Bayesian: the plain parameters are averaged too.
    bm = fastbnf.BayesianModel(
        net, init_logvar=-4.0, exclude_params=["2.bias"], fold_rank=fold_rank
    )
    optimizer = VariationalAdam(bm, lr=1e-2, kl_weight=1e-3, capturable=capturable)
    model = nn.parallel.DistributedDataParallel(bm.base) if ddp else bm.base
    for x, y in batches(rank):
        (model(x) - y).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    tensors = [*bm.means.values(), *bm.logvars.values(), net[2].bias]
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def ranks_train(rank: int, init_file: str, out_dir: str) -> None:
    ranks.init(rank, init_file)
    for fold_rank in (False, True):
        torch.save(train(rank, fold_rank), f"{out_dir}/rank{rank}-fold{int(fold_rank)}.pt")
    torch.save(train(rank, False, capturable=True), f"{out_dir}/rank{rank}-capturable.pt")
    try:
        train(rank, True, capturable=True)
        message = ""
    except RuntimeError as error:
        message = str(error)
    torch.save(message, f"{out_dir}/capturable-fold-rank{rank}.pt")
    dist.barrier()


def test_two_ranks_equal_one_process_with_the_whole_batch(tmp_path: Path):
    ranks.run(ranks_train, str(tmp_path / "init"), str(tmp_path))

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

    # Capturable: the same steps; with each rank's own noise, refused (the average needs the
    # host's count).
    for r in range(WORLD):
        assert torch.equal(torch.load(tmp_path / f"rank{r}-capturable.pt"), shared[0])
        message = torch.load(tmp_path / f"capturable-fold-rank{r}.pt")
        assert "capturable=True cannot average" in message and "fold_rank=False" in message


def ranks_train_ddp(rank: int, init_file: str, out_dir: str) -> None:
    ranks.init(rank, init_file)
    torch.save(train(rank, fold_rank=False, ddp=True), f"{out_dir}/ddp-rank{rank}.pt")
    try:
        train(rank, fold_rank=True, ddp=True)
        message = ""
    except RuntimeError as error:
        message = str(error)
    torch.save(message, f"{out_dir}/ddp-fold-rank{rank}.pt")
    dist.barrier()


def test_a_ddp_wrapped_base_with_one_sample_equals_one_process(tmp_path: Path):
    r"""DistributedDataParallel averages the samples' gradients: right with fold_rank=False
    (one sample on every rank), whose steps then equal one process with the whole batch; with
    fold_rank=True the first step raises, naming the fix, on every rank."""

    ranks.run(ranks_train_ddp, str(tmp_path / "init"), str(tmp_path))

    wrapped = [torch.load(tmp_path / f"ddp-rank{r}.pt") for r in range(WORLD)]
    assert torch.equal(wrapped[0], wrapped[1])
    torch.testing.assert_close(wrapped[0], train(None, fold_rank=False), rtol=1e-12, atol=1e-14)

    for r in range(WORLD):
        message = torch.load(tmp_path / f"ddp-fold-rank{r}.pt")
        assert "equal on every rank" in message and "fold_rank=False" in message
