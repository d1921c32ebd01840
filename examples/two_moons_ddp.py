r"""Data-parallel training of a Bayesian normalizing flow on the two-moons data.

Run on two CPU processes (gloo), or one process per GPU (NCCL) with the same code:

    torchrun --nproc_per_node=2 examples/two_moons_ddp.py
    torchrun --nproc_per_node=8 examples/two_moons_ddp.py --device cuda --steps 2000

``python examples/two_moons_ddp.py`` runs it as a single process.

Each rank draws its own batch and, although every rank is seeded alike, its own posterior noise
(fastbnf folds the rank into the noise's key). DistributedDataParallel averages the gradients,
so the per-rank loss is "mean NLL of the local batch + kl_weight * KL": the KL term is the same
on every rank and is not divided by the world size.
"""

import argparse
import math
import os
import time
import torch
import torch.distributed as dist
import zuko

from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

import fastbnf


def two_moons(n: int, generator: torch.Generator, device: str) -> tuple[Tensor, Tensor]:
    r"""Returns n points of the two-moons data and their moon label (the flow's context)."""

    label = torch.randint(0, 2, (n, 1), generator=generator).float()
    angle = math.pi * torch.rand(n, generator=generator)
    upper = torch.stack((angle.cos(), angle.sin()), dim=-1)
    lower = torch.stack((1 - angle.cos(), 0.5 - angle.sin()), dim=-1)
    x = torch.where(label.bool(), lower, upper) - torch.tensor([0.5, 0.25])
    x = x + 0.05 * torch.randn(n, 2, generator=generator)
    return x.to(device), label.to(device)


def nll(flow: torch.nn.Module, x: Tensor, c: Tensor) -> Tensor:
    return -flow(c).log_prob(x).mean()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps")
    parser.add_argument("--batch", type=int, default=256, help="batch size per rank")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--kl-weight", type=float, default=1e-6, help="lambda in NLL + lambda KL")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (one GPU per rank)")
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--save", default=None, help="where rank 0 saves the state_dict")
    args = parser.parse_args()

    # Without torchrun: a world of one.
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")

    if args.device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device, device_ids = f"cuda:{local_rank}", [local_rank]
        dist.init_process_group("nccl")
    else:
        device, device_ids = "cpu", None
        dist.init_process_group("gloo")

    rank, world = dist.get_rank(), dist.get_world_size()

    # Seeded alike: the replicas start identical (DDP also broadcasts rank 0's state).
    torch.manual_seed(0)
    flow = zuko.flows.NSF(features=2, context=1, transforms=3, hidden_features=(64, 64))
    bm = fastbnf.BayesianModel(
        flow.to(device),
        init_logvar=-9.0,
        include_params=["transform.transforms.*.hyper.4"],
        exclude_params=["**.bias"],
    )
    ddp = DistributedDataParallel(bm, device_ids=device_ids)
    optimizer = torch.optim.Adam(ddp.parameters(), lr=args.lr)

    data = torch.Generator().manual_seed(1000 + rank)  # each rank its own batches

    if rank == 0:
        print(f"world={world} device={device} backend={fastbnf.backend(device)}")

    start = time.perf_counter()

    for step in range(1, args.steps + 1):
        x, c = two_moons(args.batch, data, device)

        # ddp(fn, ...) runs fn(reparameterized_flow, ...) inside bm.reparameterize().
        loss = ddp(nll, x, c) + args.kl_weight * bm.kl_divergence()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

        if step % args.log_every == 0 or step == args.steps:
            value = loss.detach().clone()
            dist.all_reduce(value)
            if rank == 0:
                elapsed = time.perf_counter() - start
                print(f"step {step:5d}  loss {value.item() / world:.4f}  ({elapsed:.1f} s)")

    if rank == 0 and args.save:
        torch.save(bm.state_dict(), args.save)

    dist.destroy_process_group()


if __name__ == "__main__":
    main()
