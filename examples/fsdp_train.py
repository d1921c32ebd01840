r"""Sharded data-parallel training (FSDP2) of a Bayesian MLP on a 1-d regression.

Run on two CPU processes (gloo), or one process per GPU (NCCL) with the same code:

    torchrun --nproc-per-node 2 -m examples.fsdp_train
    torchrun --nproc-per-node 8 -m examples.fsdp_train --device cuda --steps 2000

``python -m examples.fsdp_train`` runs it as a single process (a world of one); ``--optim``
trains with :class:`fastbnf.optim.VariationalAdam` instead (below).

``fully_shard(bm)`` shards the posterior (the means and log-variances) and the base model's
weights over the ranks: each rank stores 1 / world of them. The model's methods gather the
posterior where the ops read it: ``kl_divergence()``, ``reparameterize()``, ``sample_params()``
and ``predict()`` run as forwards of the sharded model, and FSDP reduce-scatters the gradients
(their mean over the ranks) after the backward. Each rank draws its own batch and its own noise
(``fold_rank``), and the KL term is not divided by the world size, as with
``DistributedDataParallel``.

With ``--optim``, :class:`fastbnf.optim.VariationalAdam` is created first and ``fully_shard()``
applied to the base model's layers and the base model: the loop is a plain model's, the base
model's forward gathers the samples, and the optimizer keeps the posterior, its moments and the
samples in each rank's rows, stepping them on the gradients that FSDP reduce-scatters. Every rank
draws the same noise (``fold_rank=False``). The posterior predictive at the end is computed from
the gathered state dict, in an unsharded copy of the model.
"""

import argparse
import os
import time
import torch
import torch.distributed as dist
import torch.nn as nn

from torch import Tensor
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import fastbnf


def batch(n: int, generator: torch.Generator, device: str) -> tuple[Tensor, Tensor]:
    r"""Returns n points of y = sin(3 x) + noise, with x in [-1, 1]."""

    x = 2 * torch.rand(n, 1, generator=generator) - 1
    y = (3 * x).sin() + 0.1 * torch.randn(n, 1, generator=generator)
    return x.to(device), y.to(device)


def mlp(width: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(1, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1)
    )


def train(
    steps: int = 300,
    batch_size: int = 64,
    width: int = 64,
    lr: float = 1e-2,
    kl_weight: float = 1e-4,
    device: str = "cpu",
    log_every: int = 100,
    optim: bool = False,
) -> dict[str, Tensor]:
    r"""Trains the sharded Bayesian MLP on every rank of the initialized process group and
    returns its full state dict (the same on every rank); with ``optim``, with
    :class:`fastbnf.optim.VariationalAdam`."""

    rank = dist.get_rank()
    # The mesh's device type said: by default it is CUDA wherever CUDA is, even under gloo.
    mesh = init_device_mesh(torch.device(device).type, (dist.get_world_size(),))

    # Seeded alike: every rank builds the same model, which fully_shard() then splits.
    torch.manual_seed(0)
    bm = fastbnf.BayesianModel(mlp(width).to(device), init_logvar=-9.0, fold_rank=not optim)
    if optim:
        optimizer = fastbnf.optim.VariationalAdam(bm, lr=lr, kl_weight=kl_weight)
        for layer in bm.base:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(bm.base, mesh=mesh)
    else:
        fully_shard(bm, mesh=mesh)
        optimizer = torch.optim.Adam(bm.parameters(), lr=lr)  # the shards: 1 / world per rank

    data = torch.Generator().manual_seed(1000 + rank)  # each rank its own batches
    start = time.perf_counter()

    for step in range(1, steps + 1):
        x, y = batch(batch_size, data, device)

        if optim:  # a plain model's loop: the KL's gradient is the optimizer's
            nll = (bm.base(x) - y).square().mean()
            nll.backward()
        else:
            kl = bm.kl_divergence()
            with bm.reparameterize() as model:
                nll = (model(x) - y).square().mean()
                (nll + kl_weight * kl).backward()

        optimizer.step()
        optimizer.zero_grad()

        if rank == 0 and (step % log_every == 0 or step == steps):
            kl_text = "" if optim else f"  kl {kl.item():.1f}"
            print(f"step {step:5d}  mse {nll.item():.4f}{kl_text}")

    # A collective: every rank takes part, and gets the full tensors.
    state = get_model_state_dict(bm, options=StateDictOptions(full_state_dict=True))

    # The posterior predictive inside and outside the training interval [-1, 1]; the
    # optimizer's rows of the posterior in an unsharded copy of the model.
    if optim:
        bm = fastbnf.BayesianModel(mlp(width).to(device), init_logvar=-9.0)
        bm.load_state_dict(state)
    x = torch.linspace(-2, 2, 9, device=device).unsqueeze(-1)
    with torch.no_grad():
        spread = bm.predict(x, samples=32).std(dim=0).squeeze(-1)
    if rank == 0:
        elapsed = time.perf_counter() - start
        print(f"{steps} steps in {elapsed:.1f} s on {dist.get_world_size()} rank(s)")
        for xi, si in zip(x.squeeze(-1).tolist(), spread.tolist()):
            where = "in " if abs(xi) <= 1 else "out"
            print(f"x = {xi:+.1f} ({where})  predictive std {si:.4f}")
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps")
    parser.add_argument("--batch", type=int, default=64, help="batch size per rank")
    parser.add_argument("--width", type=int, default=64, help="hidden width")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--kl-weight", type=float, default=1e-4, help="lambda in MSE + lambda KL")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (one GPU per rank)")
    parser.add_argument("--save", default=None, help="where rank 0 saves the full state_dict")
    parser.add_argument(
        "--optim", action="store_true", help="VariationalAdam, the posterior sharded with it"
    )
    args = parser.parse_args()

    # Without torchrun: a world of one.
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29518")

    if args.device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
        dist.init_process_group("nccl")
    else:
        device = "cpu"
        dist.init_process_group("gloo")

    try:
        state = train(
            args.steps, args.batch, args.width, args.lr, args.kl_weight, device, optim=args.optim
        )
        if args.save and dist.get_rank() == 0:
            torch.save(state, args.save)
            print(f"saved {len(state)} tensors to {args.save}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
