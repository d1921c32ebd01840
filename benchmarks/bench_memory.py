r"""Bytes kept for backward per parameter, and the forward alone (KL + sample + loss).

The bytes are counted with ``saved_tensors_hooks`` over unique storages, leaving out the
model's parameters (zuko keeps ~36 B per parameter: noise, sigma and softclip intermediates;
fastbnf keeps the 16-byte ``rng_state`` only). They go in ``extra_info["saved_bytes"]``.
"""

import torch

from ._harness import (
    LinearLoss,
    bayesian_contenders,
    devices,
    forward_only,
    info,
    mlp_of_size,
    numel,
    peak_cuda_bytes,
    require_backend,
    run,
    saved_bytes,
    split_contender,
    wrap,
)

SIZES = [10_000, 100_000, 1_000_000, 10_000_000]


def pytest_generate_tests(metafunc):
    if "size" not in metafunc.fixturenames:
        return
    quick = bool(metafunc.config.getoption("benchmark_disable"))
    sizes = [1_000_000] if quick else SIZES
    params, ids = [], []
    for device in devices():
        for n in sizes:
            for contender in bayesian_contenders(device):
                params.append((device, n, contender))
                ids.append(f"{n:.0e}-{device}-{contender}")
    metafunc.parametrize("device,size,contender", params, ids=ids)


def test_saved_bytes(benchmark, quick, monkeypatch, device, size, contender):
    backend, fused = split_contender(contender)
    if backend != "zuko":
        require_backend(backend, device, monkeypatch)

    base = mlp_of_size(size, device)
    n = numel(base)
    loss_fn = LinearLoss(base)
    bm = wrap(backend, base)

    kept = saved_bytes(bm, fused, loss_fn)
    per_param = kept / n

    benchmark.group = f"forward/size-{size:.0e}/{device}"
    info(
        benchmark,
        kind="memory",
        contender=contender,
        case=f"size-{size:.0e}",
        device=device,
        size=n,
        tensors=sum(1 for _ in base.parameters()),
        style="fused" if fused else "seed",
        saved_bytes=kept,
        saved_bytes_per_param=per_param,
    )

    if backend == "zuko":
        print(f"zuko keeps {per_param:.1f} B/param for backward at {n:.2e} parameters")
    elif n >= 1_000_000:
        assert per_param < 1.0, f"fastbnf ({contender}) keeps {per_param:.2f} B/param ({kept} B)"

    def forward():
        forward_only(bm, fused, loss_fn)
        if device == "cuda":
            torch.cuda.synchronize()

    run(benchmark, forward, quick)

    if device == "cuda":

        def full():
            forward_only(bm, fused, loss_fn).backward()

        info(benchmark, peak_bytes=peak_cuda_bytes(full))
