r"""Two gloo ranks in child processes, for the data-parallel tests."""

import datetime
import multiprocessing
import os
import sys
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2

# A spawned process imports torch again, and DistributedDataParallel imports torch._dynamo on
# construction: seconds per rank on a 2-core machine. A fork server imports them once and forks
# every rank from there (a plain fork of the test process, whose threads may hold locks, can
# deadlock).
START = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"


def init(rank: int, init_file: str, world: int = WORLD) -> None:
    r"""Joins the gloo group of ``world`` ranks of the file ``init_file``, one thread per
    rank."""

    torch.set_num_threads(1)
    # A failed assertion on one rank must not leave the other waiting in a collective for
    # gloo's default 30 minutes.
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )


def _entry(rank: int, target, *args) -> None:
    try:
        target(rank, *args)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    # Leave without tearing the process group down: gloo's destructor can deadlock at exit
    # (seen on the 2-core development machine); the targets end with a barrier.
    sys.stdout.flush()
    os._exit(0)


def run(
    target, *args, preload=("torch", "fastbnf"), timeout: float = 120, world: int = WORLD
) -> None:
    r"""Runs ``target(rank, *args)`` on each of ``world`` ranks and waits; a rank that fails or
    hangs fails the test (not the whole run)."""

    if START == "forkserver":
        multiprocessing.set_forkserver_preload(list(preload))
    context = mp.start_processes(
        _entry, args=(target, *args), nprocs=world, join=False, start_method=START
    )
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {world} ranks did not finish within {timeout:.0f} s")
