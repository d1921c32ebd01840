r"""Where the host time of a small model's training step goes, phase by phase (CPU).

Usage::

    python -m benchmarks.host_phases [--steps 3000] [--json PATH]

The tutorial's MLP (5-64-64-5) with its real forward (a batch of 64, mean squared error), the
seed-style step without optimizer: ``zero_grad()``, ``kl_divergence()``, entering
``reparameterize()`` (sampling and swapping the samples in), forward and loss, ``backward()``,
leaving the context. zuko's step and the plain model's are timed whole, after fastbnf's. Prints
the median of each phase over the steps, in microseconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import zuko

import fastbnf

from ._harness import machine, tutorial_mlp

PHASES = ("zero_grad", "kl_divergence", "enter", "forward_loss", "backward", "exit")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--json", default=None, help="also write the medians there")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    x, y = torch.randn(64, 5), torch.randn(64, 5)
    plain = tutorial_mlp("cpu")
    ours = fastbnf.BayesianModel(tutorial_mlp("cpu"))
    theirs = zuko.bayesian.BayesianModel(tutorial_mlp("cpu"))
    clock = time.perf_counter
    phases = {p: [] for p in PHASES}
    whole = {"fastbnf": [], "zuko": [], "plain": []}

    def fastbnf_step(record: bool) -> None:
        t0 = clock()
        ours.zero_grad()
        t1 = clock()
        kl = ours.kl_divergence()
        t2 = clock()
        context = ours.reparameterize()
        model = context.__enter__()
        t3 = clock()
        loss = (model(x) - y).square().mean() + 1e-3 * kl
        t4 = clock()
        loss.backward()
        t5 = clock()
        context.__exit__(None, None, None)
        t6 = clock()
        if record:
            stamps = (t0, t1, t2, t3, t4, t5, t6)
            for phase, start, end in zip(PHASES, stamps, stamps[1:]):
                phases[phase].append(end - start)
            whole["fastbnf"].append(t6 - t0)

    def zuko_step(record: bool) -> None:
        t0 = clock()
        theirs.zero_grad()
        kl = theirs.kl_divergence()
        with theirs.reparameterize() as model:
            loss = (model(x) - y).square().mean() + 1e-3 * kl
            loss.backward()
        if record:
            whole["zuko"].append(clock() - t0)

    def plain_step(record: bool) -> None:
        t0 = clock()
        plain.zero_grad()
        (plain(x) - y).square().mean().backward()
        if record:
            whole["plain"].append(clock() - t0)

    # One contender at a time, as a training loop runs: interleaved, each step would start
    # with the others' code and data in the caches.
    for step in (fastbnf_step, zuko_step, plain_step):
        for i in range(args.steps + 200):
            step(record=i >= 200)

    us = {k: 1e6 * statistics.median(v) for k, v in {**phases, **whole}.items()}
    for key, value in us.items():
        print(f"{key:>14}: {value:8.1f} µs")
    print(f"{'zuko / fastbnf':>14}: {us['zuko'] / us['fastbnf']:8.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "steps": args.steps, "median_us": us}, f, indent=1)


if __name__ == "__main__":
    main()
