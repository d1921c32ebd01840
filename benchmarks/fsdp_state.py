r"""Bytes of training state per rank under FSDP2 (``fully_shard``), at world sizes 1, 2 and 4.

Counts, on every rank of a gloo world on the CPU, the bytes of the tensors that training keeps
between steps, after one step of a Bayesian MLP (4 layers of 512, every parameter Bayesian):

- ``tutorial``: zuko's loop with ``fully_shard(bm)`` (as ``examples/fsdp_train.py``) and
  ``torch.optim.Adam`` on the model's parameters: the posterior, its moments and the frozen
  weights are DTensors, 1 / W per rank;
- ``variational-adam``: :class:`fastbnf.optim.VariationalAdam` with ``fully_shard(bm.base)``: the
  base's samples are DTensors, and the optimizer keeps the posterior, its moments, the flat
  sample and its gradient in the samples' rows (:mod:`fastbnf.optim.shards`), and so the base
  model's frozen weights that it keeps for the model's state dict: 1 / W per rank;
- ``variational-adam, keep_base_weights=False``: the same without frozen weights (the model's
  base weights are its means).

Byte counts, not timings: one run says all. Writes ``benchmarks/results/<name>.{md,json}``::

    python -m benchmarks.fsdp_state --name cpu-2core-2026-12-03-fsdp-state
"""

import argparse
import torch
import torch.nn as nn

from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import fastbnf

from ._fsdp import mlp, run_ranks, shard_layers, write_record

WIDTH, DEPTH = 512, 4


def local_bytes(tensors) -> int:
    r"""The bytes that this rank stores of ``tensors``: a DTensor's local shard, once each."""

    seen, total = set(), 0
    for t in tensors:
        t = t.to_local() if isinstance(t, DTensor) else t
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def step(model: nn.Module, optimizer: torch.optim.Optimizer, bm=None) -> None:
    x = torch.randn(8, WIDTH)
    if bm is None:
        loss = model(x).square().mean()
    else:
        with bm.reparameterize() as sampled:
            loss = sampled(x).square().mean() + 1e-3 * bm.kl_divergence()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


MODES = ("tutorial", "variational-adam", "variational-adam, keep_base_weights=False")


def measure(mode: str, world: int) -> dict:
    mesh = init_device_mesh("cpu", (world,))
    # VariationalAdam under FSDP needs the same sample on every rank (fold_rank=False).
    bm = fastbnf.BayesianModel(
        mlp(WIDTH, DEPTH),
        init_logvar=-9.0,
        fold_rank=mode == "tutorial",
        keep_base_weights=not mode.endswith("keep_base_weights=False"),
    )
    if mode == "tutorial":
        fully_shard(bm, mesh=mesh)  # as examples/fsdp_train.py
        optimizer = torch.optim.Adam(bm.parameters(), lr=1e-3)
        step(bm.base, optimizer, bm)
        moments = [t for s in optimizer.state.values() for t in s.values() if t.dim() > 0]
        parts = {
            "posterior": local_bytes([*bm.means.values(), *bm.logvars.values()]),
            "moments": local_bytes(moments),
            "flat sample and gradient": 0,  # drawn in each step's graph, freed after its backward
            "base model": local_bytes(bm.base.parameters()),  # the frozen weights
            "frozen weights kept by the optimizer": 0,
        }
    else:
        optimizer = fastbnf.optim.VariationalAdam(bm, lr=1e-3)
        shard_layers(bm.base, mesh)
        step(bm.base, optimizer)
        # The optimizer's flat buffers (internal): the sample, its gradient, the two moments;
        # and the base model's weights that its slots keep (none where they are the means).
        posterior = [*bm.means.values(), *bm.logvars.values()]
        held = bm._slots.held.originals.values()
        parts = {
            "posterior": local_bytes(posterior),
            "moments": local_bytes([*optimizer._exp_avgs, *optimizer._exp_avg_sqs]),
            "flat sample and gradient": local_bytes([*optimizer._thetas, *optimizer._grads]),
            "base model": local_bytes(bm.base.parameters()),  # the samples' shards
            "frozen weights kept by the optimizer": local_bytes(
                [w for w in held if not any(w is p for p in posterior)]
            ),
        }
    return parts


def measure_modes(world: int) -> dict:
    return {mode: measure(mode, world) for mode in MODES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    args = parser.parse_args()
    worlds = {w: run_ranks(measure_modes, w) for w in (1, 2, 4)}
    mib = 2.0**20
    lines = [
        f"# {args.name}: training state per rank under FSDP2",
        "",
        f"- Command: `python -m benchmarks.fsdp_state --name {args.name}`.",
        f"- Model: MLP of {DEPTH} layers of {WIDTH}, every parameter Bayesian, float32; one step,"
        " gloo ranks on the CPU. Bytes of rank 0 (the largest shard), MiB.",
        "",
        "| mode | W | posterior | moments | flat sample and gradient | base model |"
        " frozen weights kept by the optimizer | total |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for mode in MODES:
        for w, ranks in worlds.items():
            parts = ranks[0][mode]
            cells = " | ".join(f"{v / mib:.2f}" for v in parts.values())
            lines.append(f"| {mode} | {w} | {cells} | {sum(parts.values()) / mib:.2f} |")
    lines += [
        "",
        "The base model's column holds the frozen weights in the tutorial loop and the samples'"
        " shards that FSDP gathers under `VariationalAdam`, which keeps the posterior, its"
        " moments, the flat sample and its gradient in the samples' rows, and the frozen weights"
        " that it keeps for the model's state dict too: all 1 / W per rank."
        " `keep_base_weights=False` has no frozen weights.",
    ]
    write_record(args.name, worlds, lines)


if __name__ == "__main__":
    main()
