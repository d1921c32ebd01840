r"""Opt-in (``--run-slow``): the seed-style sampling + KL under ``torch.compile``, compile time
included, for zuko and fastbnf.

The contenders ``zuko-compile`` and ``fastbnf-compile`` (the compiled kernels where built) join
the ``step/<case>/cpu`` groups of ``bench_step.py``, so the report puts them beside eager zuko
and fastbnf. ``extra_info["compile_s"]`` holds the time of the first step (tracing, compiling and
running once); the report adds it to the steady-state median to give the number of steps after
which compiling pays off.
"""

import time

import pytest
import torch

from ._harness import (
    LinearLoss,
    bag,
    count,
    devices,
    info,
    linear_stack,
    numel,
    run,
    sync,
    tutorial_mlp,
    wrap,
)

CASES = {
    "tutorial-mlp": tutorial_mlp,
    "tensors-500x1000": lambda d: bag(500, 500_000, d),
    "stack-25M": lambda d: linear_stack(1024, 24, d, norm=True),
}


@pytest.mark.slow
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("contender", ["zuko", "fastbnf"])
def test_compiled(benchmark, quick, device, case, contender):
    base = CASES[case](device) if not quick else tutorial_mlp(device)
    loss_fn = LinearLoss(base)
    bm = wrap(contender, base)
    params = list(bm.parameters())
    done = sync(device)

    def forward():
        kl = bm.kl_divergence()
        sampled = bm.sample_params()  # in named_parameters() order, as LinearLoss's w
        linear = torch.cat([v.reshape(-1) for v in sampled.values()]) @ loss_fn.w
        return linear + 1e-6 * kl

    compiled = torch.compile(forward)

    def step():
        for p in params:
            p.grad = None
        compiled().backward()
        done()

    torch._dynamo.reset()
    start = time.perf_counter()
    step()
    compile_s = time.perf_counter() - start

    benchmark.group = f"step/{case}/{device}"
    info(
        benchmark,
        kind="step",
        contender=f"{contender}-compile",
        case=case,
        device=device,
        size=numel(base),
        tensors=count(base),
        style="seed",
        compile_s=compile_s,
    )
    run(benchmark, step, quick)
