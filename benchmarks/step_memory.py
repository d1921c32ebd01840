r"""Peak memory of one whole training step with Adam, measured in a fresh process.

``python -m benchmarks.step_memory CONTENDER SIZE DEVICE`` builds an MLP of about SIZE
parameters (``_harness.mlp_of_size``: six square Linear layers, all Bayesian), wraps it for the
contender, takes one warm-up step (so that Adam's state exists), then measures one more step and
prints a JSON line:

- ``state_bytes``: what the model and its optimizer hold between steps (the base model, the
  posterior, gradients, Adam's moments, the held sample), above the process before the model;
- ``peak_bytes``: the peak during the step (the state plus the step's transients: samples,
  noise, what autograd keeps, gradients before they land), above the same baseline.

On the CPU these are the resident set (``VmRSS``, and the high-water mark ``VmHWM`` reset before
the step through ``/proc/self/clear_refs``), so they count whole pages, and memory that the
allocator keeps after freeing it counts as held; on CUDA, ``torch.cuda.memory_allocated`` and
``max_memory_allocated``. A fresh process per case: the allocator of a previous case would
otherwise lend its freed memory to the next.

Contenders: ``plain`` (the MLP itself, Adam on its weights), ``zuko`` and the fastbnf backends'
seed-style loop (Adam on ``means`` and ``logvars``), ``<backend>-optim``
(:class:`fastbnf.optim.VariationalAdam`), and the seed-style loop with the memory options,
``<backend>-nobase`` (``keep_base_weights=False``) and ``<backend>-bf16``
(``posterior_dtype=torch.bfloat16``).
"""

import json
import os
import sys
import torch

from pathlib import Path

from ._harness import LinearLoss, mlp_of_size, numel, wrap


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


class _Meter:
    r"""The process's memory on a device: its current use and the peak since :meth:`reset`."""

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"

    def now(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()
        return _rss("VmRSS")

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM back to VmRSS

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return _rss("VmHWM")


# Contenders <backend>-<option>: BayesianModel's memory options.
_OPTIONS = {
    "nobase": {"keep_base_weights": False},
    "bf16": {"posterior_dtype": torch.bfloat16},
}


def _step_fn(contender: str, base: torch.nn.Module):
    r"""One training step of the contender, and the number of trained parameters."""

    # The loss reads the base model's slots: its weights, a sample inside reparameterize(), or
    # the sample VariationalAdam holds. Linear in them: no activations to count.
    loss_fn = LinearLoss(base)
    backend, _, mode = contender.partition("-")
    if contender == "plain":
        optimizer = torch.optim.Adam(base.parameters(), lr=1e-4)
        loss = loss_fn
    elif mode == "optim":
        from fastbnf.optim import VariationalAdam

        optimizer = VariationalAdam(wrap(backend, base), lr=1e-4, kl_weight=1e-6)
        loss = loss_fn
    else:
        if mode in _OPTIONS:  # fastbnf's memory options, with the seed's loop
            import fastbnf

            bm = fastbnf.BayesianModel(base, **_OPTIONS[mode])
        else:
            bm = wrap(backend, base)
        optimizer = torch.optim.Adam(bm.parameters(), lr=1e-4)

        def loss():
            kl = bm.kl_divergence()
            with bm.reparameterize():
                return loss_fn() + 1e-6 * kl

    def step():
        loss().backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def measure(contender: str, size: int, device: str) -> dict:
    meter = _Meter(device)
    torch.manual_seed(0)
    baseline = meter.now()
    base = mlp_of_size(size, device)
    n = numel(base)
    step = _step_fn(contender, base)
    step()  # Adam's state, the optimizer's buffers
    state = meter.now() - baseline
    meter.reset()
    step()
    peak = meter.peak() - baseline
    return {
        "contender": contender,
        "device": device,
        "size": n,
        "state_bytes": state,
        "peak_bytes": peak,
        "state_bytes_per_param": state / n,
        "peak_bytes_per_param": peak / n,
    }


if __name__ == "__main__":
    contender, size, device = sys.argv[1], int(float(sys.argv[2])), sys.argv[3]
    backend = contender.partition("-")[0]
    if backend not in ("plain", "zuko"):
        os.environ["FASTBNF_BACKEND"] = backend  # read at each call
    print(json.dumps(measure(contender, size, device)))
