r"""The fused CUDA kernels against the copy bandwidth: a markdown table for the GPU record.

Run by ``benchmarks/gpu_check.sh`` (``python -m benchmarks.bench_kernels``); it holds no pytest
test. For fp32 groups of 1e7, 1e8 and 1e9 parameters, in tensors of 1M elements and in a
many-tensor layout (tensors of 1,000 elements: 100k tensors at 1e8; 1e9 is skipped there), it
times each kernel op alone and compares its bytes per parameter with a device-to-device copy of
as many floats (8 B/param: read and write):

- forward: ``sample_kernel`` with the KL, 12 B/param (read mu and logvar, write theta);
- backward: ``sample_backward_kernel`` with the KL, 20 B/param (read mu, logvar and grad_theta,
  write the two gradients);
- forward + backward, 32 B/param; the KL alone (``kl_kernel``), 8 B/param.

Each op is captured once in a CUDA graph and timed over replays, so the figures are the
kernels' (a memset at most besides), not the host's work on 100k tensors.
"""

from __future__ import annotations

import sys
import time


def _graph_ms(fn, reps: int) -> float:
    import torch

    fn()  # the device table is built once, eagerly
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / reps
    del graph
    return ms


def _copy_ms(n: int, reps: int) -> float:
    import torch

    src = torch.empty(n, device="cuda")
    dst = torch.empty_like(src)
    ms = _graph_ms(lambda: dst.copy_(src), reps)
    del src, dst
    return ms


def table(sizes=(10_000_000, 100_000_000, 1_000_000_000), budget_s: float = 150.0) -> list[str]:
    import torch

    import fastbnf  # noqa: F401  (registers the ops)

    K = torch.ops.fastbnf
    t0 = time.perf_counter()
    lines = [
        "| layout | parameters | op | time (ms) | bytes / param | GB/s | of copy |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    layouts = [("tensors of 1M", 1_000_000), ("tensors of 1,000", 1_000)]
    for label, chunk in layouts:
        for n in sizes:
            if chunk == 1_000 and n > 100_000_000:
                lines.append(f"| {label} | {n:.0e} | skipped (1M tensors: host time) | | | | |")
                continue
            if time.perf_counter() - t0 > budget_s:
                lines.append(f"| {label} | {n:.0e} | skipped (time budget) | | | | |")
                continue
            reps = 5 if n >= 1_000_000_000 else (20 if n >= 100_000_000 else 50)
            flat_mu = torch.randn(n, device="cuda")
            flat_lv = torch.full((n,), -9.0, device="cuda")
            means = list(flat_mu.split(chunk))
            logvars = list(flat_lv.split(chunk))
            theta, _, state = K.sample_kernel(means, logvars, None, None, True, 1.0, None, None, 0)
            grad = torch.randn_like(theta)
            grad_kl = torch.ones((), device="cuda")
            copy_ms = _copy_ms(n, reps)
            copy_bw = 8 * n / copy_ms / 1e6
            fwd_ms = _graph_ms(
                lambda: K.sample_kernel(means, logvars, None, None, True, 1.0, None, None, 0),
                reps,
            )
            bwd_ms = _graph_ms(
                lambda: K.sample_backward_kernel(
                    grad, grad_kl, means, logvars, state, True, 1.0, None, None
                ),
                reps,
            )
            kl_ms = _graph_ms(lambda: K.kl_kernel(means, logvars, 1.0, None, None), reps)
            lines.append(
                f"| {label} | {n:.0e} | copy (reference) | {copy_ms:.3f} | 8 | {copy_bw:.0f} "
                "| 100% |"
            )
            for op, ms, b in (
                ("forward (sample + KL)", fwd_ms, 12),
                ("backward (sample + KL)", bwd_ms, 20),
                ("forward + backward", fwd_ms + bwd_ms, 32),
                ("KL alone", kl_ms, 8),
            ):
                bw = b * n / ms / 1e6
                lines.append(
                    f"| {label} | {n:.0e} | {op} | {ms:.3f} | {b} | {bw:.0f} "
                    f"| {100 * bw / copy_bw:.0f}% |"
                )
            del means, logvars, flat_mu, flat_lv, theta, grad, state
            torch.cuda.empty_cache()
    lines.append("")
    lines.append(f"({time.perf_counter() - t0:.0f} s; CUDA graph replays, fp32, logvar -9)")
    return lines


if __name__ == "__main__":
    import torch

    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA GPU", file=sys.stderr)
        sys.exit(1)
    print("\n".join(table()))
