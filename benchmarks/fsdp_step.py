r"""The training step's time under FSDP2 (``fully_shard``), Bayesian against plain, same run.

On two gloo ranks on the CPU (one thread each), an MLP whose every parameter is Bayesian takes
whole training steps (forward, backward, ``optimizer.step()``, ``zero_grad()``) in turns with:

- ``plain + Adam(fused=True)``: the same MLP without a posterior, ``fully_shard`` per layer and
  at the root, :class:`torch.optim.Adam` with ``fused=True``: the baseline;
- ``VariationalAdam``: :class:`fastbnf.optim.VariationalAdam`, then ``fully_shard`` of the base
  model's layers and of the base model; the posterior, its moments and the sample in the
  samples' rows (``keep_base_weights=False``);
- ``tutorial + Adam(fused=True)``: zuko's loop (``kl_divergence()``, ``reparameterize()``) with
  ``fully_shard(bm)`` and fused Adam on the posterior.

The contenders take their steps in turns, so that the machine's drift hits them alike. A step's
time is the slowest rank's; the record gives, per run, the median over the rounds and its ratio
over the baseline's, and the median of those ratios over the runs. Writes
``benchmarks/results/<name>.{md,json}``::

    python -m benchmarks.fsdp_step --name cpu-2core-2026-12-03-fsdp-step --runs 5
"""

import argparse
import statistics
import time
import torch
import torch.distributed as dist
import torch.nn as nn

from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import fastbnf

from ._fsdp import mlp, run_ranks, shard_layers, write_record

WORLD, WIDTH, DEPTH, BATCH = 2, 1024, 4, 64
WARMUP, ROUNDS = 5, 30
CONTENDERS = ("plain + Adam(fused=True)", "VariationalAdam", "tutorial + Adam(fused=True)")


def contenders(mesh) -> dict:
    r"""Each contender's step, a function of the batch."""

    plain = mlp(WIDTH, DEPTH)
    shard_layers(plain, mesh)
    adam = torch.optim.Adam(plain.parameters(), lr=1e-4, fused=True)

    def plain_step(x, y):
        nn.functional.mse_loss(plain(x), y).backward()
        adam.step()
        adam.zero_grad()

    bm = fastbnf.BayesianModel(
        mlp(WIDTH, DEPTH), init_logvar=-9.0, fold_rank=False, keep_base_weights=False
    )
    variational = fastbnf.optim.VariationalAdam(bm, lr=1e-4, num_data=60000)
    shard_layers(bm.base, mesh)

    def variational_step(x, y):
        nn.functional.mse_loss(bm.base(x), y).backward()
        variational.step()
        variational.zero_grad()

    tutorial = fastbnf.BayesianModel(mlp(WIDTH, DEPTH), init_logvar=-9.0)
    fully_shard(tutorial, mesh=mesh)  # as examples/fsdp_train.py
    tutorial_adam = torch.optim.Adam(tutorial.parameters(), lr=1e-4, fused=True)

    def tutorial_step(x, y):
        kl = tutorial.kl_divergence()
        with tutorial.reparameterize() as sampled:
            loss = nn.functional.mse_loss(sampled(x), y) + kl / 60000
        loss.backward()
        tutorial_adam.step()
        tutorial_adam.zero_grad()

    return dict(zip(CONTENDERS, (plain_step, variational_step, tutorial_step)))


def time_steps(world: int) -> dict[str, list[float]]:
    r"""Each contender's step times on this rank: the slowest rank's, per round."""

    steps = contenders(init_device_mesh("cpu", (world,)))
    generator = torch.Generator().manual_seed(dist.get_rank())
    times = {name: [] for name in steps}
    for round_ in range(WARMUP + ROUNDS):
        for name, step in steps.items():
            x = torch.randn(BATCH, WIDTH, generator=generator)
            y = torch.randn(BATCH, WIDTH, generator=generator)
            dist.barrier()
            start = time.perf_counter()
            step(x, y)
            elapsed = torch.tensor(time.perf_counter() - start, dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank's
            if round_ >= WARMUP:
                times[name].append(elapsed.item())
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    # The times are the slowest rank's: rank 0's list holds them.
    runs = [run_ranks(time_steps, WORLD)[0] for _ in range(args.runs)]

    baseline = CONTENDERS[0]
    medians = [{name: statistics.median(t) for name, t in run.items()} for run in runs]
    params = DEPTH * (WIDTH * WIDTH + WIDTH)
    lines = [
        f"# {args.name}: the training step under FSDP2, Bayesian against plain",
        "",
        f"- Command: `python -m benchmarks.fsdp_step --name {args.name} --runs {args.runs}`.",
        f"- {WORLD} gloo ranks on the CPU, one thread each; MLP of {DEPTH} layers of {WIDTH}"
        f" ({params / 1e6:.1f}M parameters, every one Bayesian), float32, batch {BATCH} per"
        f" rank. Whole steps in turns, {WARMUP} rounds of warm-up, then {ROUNDS}; a step's time"
        " is the slowest rank's.",
        f"- Per run: the median step over the rounds, and its ratio over `{baseline}`'s; then the"
        f" median of the {args.runs} runs (and their range).",
        "",
        "| contender | step (ms), median of runs | ratio over the baseline, median (range) |",
        "| --- | --- | --- |",
    ]
    for name in CONTENDERS:
        ms = statistics.median(m[name] for m in medians) * 1e3
        ratios = [m[name] / m[baseline] for m in medians]
        lines.append(
            f"| {name} | {ms:.1f} | {statistics.median(ratios):.2f}x"
            f" ({min(ratios):.2f}–{max(ratios):.2f}) |"
        )
    lines += [
        "",
        "`VariationalAdam` steps the rows of the posterior that each rank keeps, on the gradients"
        " that FSDP reduce-scatters, and FSDP gathers only the samples for the forward; the"
        " tutorial loop gathers the means and log-variances, draws the whole sample on every"
        " rank, and steps Adam on both.",
    ]
    write_record(args.name, runs, lines)


if __name__ == "__main__":
    main()
