r"""The seed-style step captured in a CUDA graph and replayed, zuko's and fastbnf's (GPU only).

The step of ``bench_step.py`` (KL, sampling, a loss linear in the samples, backward), captured
once with :class:`torch.cuda.CUDAGraph` after a warm-up and timed as replays. The contenders
``zuko-graph`` and ``cuda-graph`` join the ``step/<case>/cuda`` groups of ``bench_step.py``, so
the report puts them beside the eager steps: a replay costs no host time, so what remains is
the GPU's own work.
"""

import pytest
import torch

from ._harness import LinearLoss, bag, count, info, numel, run, tutorial_mlp, wrap

CASES = {
    "tutorial-mlp": tutorial_mlp,
    "tensors-500x1000": lambda d: bag(500, 500_000, d),
}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("contender", ["zuko", "cuda"])
def test_captured(benchmark, quick, case, contender):
    base = CASES[case]("cuda")
    loss_fn = LinearLoss(base)
    bm = wrap(contender, base)

    def step():
        kl = bm.kl_divergence()
        with bm.reparameterize():
            loss = loss_fn() + 1e-6 * kl
            loss.backward()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    def replay():
        graph.replay()
        torch.cuda.synchronize()

    benchmark.group = f"step/{case}/cuda"
    info(
        benchmark,
        kind="step",
        contender=f"{contender}-graph",
        case=case,
        device="cuda",
        size=numel(base),
        tensors=count(base),
        style="seed",
    )
    run(benchmark, replay, quick)
