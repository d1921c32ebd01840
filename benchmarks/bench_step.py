r"""The Bayesian overhead of one training step, zuko against fastbnf, side by side.

One step is ``kl_divergence()`` + ``reparameterize()`` (seed style, the tutorial's) or
``reparameterize(return_kl=True)`` (fused), a loss linear in the samples, and ``backward()``.
Yardsticks in the same groups: ``plain`` (the same loss and backward on the plain parameters),
``leaves`` (the same with zuko's parameters, a mean and a log-variance per tensor, and free
sampling and KL: autograd's own per-tensor cost, below which no drop-in design can go) and
``randn`` (``torch.randn`` of as many numbers as there are parameters).
"""

import pytest
import torch

from ._harness import (
    YARDSTICKS,
    bag,
    bayesian_contenders,
    count,
    devices,
    info,
    linear_stack,
    mlp_of_size,
    numel,
    overhead_step,
    peak_cuda_bytes,
    require_backend,
    run,
    split_contender,
    tutorial_mlp,
)

CPU_SIZES = [10_000, 100_000, 1_000_000, 5_000_000, 25_000_000]
GPU_SIZES = [10_000, 1_000_000, 10_000_000, 100_000_000, 1_000_000_000]
TENSOR_COUNTS = [6, 20, 100, 500, 2000]
TENSORS_TOTAL = 500_000


def cases(device: str, quick: bool) -> list[tuple[str, object]]:
    r"""``(case, builder)`` pairs; ``quick`` keeps every case but shrinks the big ones."""

    out = [
        ("tutorial-mlp", tutorial_mlp),
        ("tensors-500x1000", lambda d: bag(500, 500_000, d)),
        # 24 x (Linear 1024x1024 + LayerNorm): 25.2M parameters in 96 tensors.
        ("stack-25M", lambda d: linear_stack(64 if quick else 1024, 24, d, norm=True)),
    ]

    sizes = [10_000, 100_000] if quick else (CPU_SIZES if device == "cpu" else GPU_SIZES)
    for n in sizes:
        out.append((f"size-{n:.0e}", lambda d, n=n: mlp_of_size(n, d)))

    for t in [6, 500] if quick else TENSOR_COUNTS:
        total = 50_000 if quick else TENSORS_TOTAL
        out.append((f"tensors-{t}", lambda d, t=t, total=total: bag(t, total, d)))

    return out


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return

    quick = bool(metafunc.config.getoption("benchmark_disable"))
    params, ids = [], []
    for device in devices():
        contenders = [*bayesian_contenders(device), *YARDSTICKS]
        for case, builder in cases(device, quick):
            for contender in contenders:
                params.append((device, case, builder, contender))
                ids.append(f"{case}-{device}-{contender}")
    metafunc.parametrize("device,case,builder,contender", params, ids=ids)


def _fits(device: str, n: int, contender: str) -> bool:
    r"""Whether a contender's step fits in the GPU's free memory (zuko keeps ~36 B/param)."""

    if device != "cuda":
        return True
    per_param = {"zuko": 80, "plain": 16, "randn": 4}.get(contender.partition("-")[0], 48)
    free, _ = torch.cuda.mem_get_info()
    return n * per_param < 0.85 * free


def test_step(benchmark, quick, monkeypatch, device, case, builder, contender):
    backend, fused = split_contender(contender)
    if backend in ("torch", "cpp", "cuda"):
        require_backend(backend, device, monkeypatch)

    base = builder(device)
    n, tensors = numel(base), count(base)
    if not _fits(device, n, contender):
        pytest.skip(f"{contender} at {n:.1e} parameters does not fit in GPU memory")

    step, _ = overhead_step(contender, base, device)

    benchmark.group = f"step/{case}/{device}"
    info(
        benchmark,
        kind="step",
        contender=contender,
        case=case,
        device=device,
        size=n,
        tensors=tensors,
        style="fused" if fused else ("seed" if contender not in YARDSTICKS else None),
    )

    run(benchmark, step, quick, budget_s=0.7)

    if device == "cuda":
        info(benchmark, peak_bytes=peak_cuda_bytes(step))
