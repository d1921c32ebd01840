r"""Shared pieces of the FSDP2 benchmark scripts (``fsdp_state.py``, ``fsdp_step.py``): the
model, its sharding, a world of gloo ranks on the CPU and the record they write."""

import json
import os
import tempfile
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from collections.abc import Callable
from pathlib import Path
from torch.distributed.fsdp import fully_shard
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def mlp(width: int, depth: int) -> nn.Sequential:
    r"""The same MLP on every rank: ``depth`` layers of ``width``, tanh between."""

    torch.manual_seed(0)
    layers = [nn.Linear(width, width) for _ in range(depth)]
    return nn.Sequential(*[m for layer in layers for m in (layer, nn.Tanh())][:-1])


def shard_layers(model: nn.Sequential, mesh) -> None:
    r"""``fully_shard`` of every linear layer, then of the model (the root)."""

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _rank(rank: int, world: int, init_file: str, out: str, measure: Callable, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    result = measure(world, *args)
    gathered = [None] * world
    dist.all_gather_object(gathered, result)
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))
    dist.destroy_process_group()


def run_ranks(measure: Callable, world: int, *args) -> list[Any]:
    r"""Runs ``measure(world, *args)`` on each of ``world`` gloo ranks (one thread each) and
    returns their results, by rank. ``measure`` is a module-level function (it is pickled)."""

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        init = os.path.join(tmp, "init")
        mp.spawn(_rank, args=(world, init, out, measure, args), nprocs=world)
        return json.loads(Path(out).read_text())


def write_record(name: str, data: Any, lines: list[str]) -> None:
    r"""Writes ``benchmarks/results/<name>.json`` (the raw data) and ``<name>.md`` (the
    lines), and prints the lines."""

    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=1))
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
