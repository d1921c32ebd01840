r"""``optimizer.step()`` alone: VariationalAdam's fused step against PyTorch's Adam.

Group ``optim-step/<size>/<device>``: a model of 8 float32 tensors (8M parameters; 80k with
``--benchmark-disable``), every one Bayesian, gradients set; only the step is timed. Contenders:

- ``adam-fused``: ``torch.optim.Adam(fused=True)``, the strongest stock baseline (28 bytes per
  parameter: the parameter, its gradient and two moments read, three of them written);
- ``adam``: ``torch.optim.Adam`` with its defaults (the per-tensor loop on the CPU, foreach on
  CUDA);
- ``variational-adam``: :class:`fastbnf.optim.VariationalAdam` with the compiled kernels (56
  bytes per parameter: the sample's gradient, the means, log-variances and their four moments
  read and written, the next sample written): its floor is twice fused Adam's;
- ``variational-adam-torch``: the same on the pure-PyTorch backend.

and the parts of the fused step, on the same posterior with the compiled kernels, to weigh what
it spends where (none of them is a step):

- ``part-sample``: ``fastbnf.ops.sample`` without gradients, one normal stream, a softclip and an
  exp per element (12 bytes per parameter);
- ``part-variance``: ``fastbnf.ops.variance``, the softclip and exp alone (8 bytes);
- ``part-copy``: a copy of the sample (8 bytes), the memory's own rate.

The step draws two normal streams (the current sample's noise, regenerated from its key, and the
next sample's): ``part-sample`` less ``part-variance`` is the price of one.
"""

import pytest
import torch
import torch.nn as nn

import fastbnf

from fastbnf._backend import has_kernel
from fastbnf.optim import VariationalAdam

from ._harness import devices, info, run, sync

CONTENDERS = [
    "adam-fused",
    "adam",
    "variational-adam",
    "variational-adam-torch",
    "part-sample",
    "part-variance",
    "part-copy",
]
TENSORS = 8


def pytest_generate_tests(metafunc):
    if "contender" in metafunc.fixturenames:
        params = [(d, c) for d in devices() for c in CONTENDERS]
        metafunc.parametrize("device,contender", params, ids=[f"8M-{d}-{c}" for d, c in params])


def test_optimizer_step(benchmark, quick, monkeypatch, device, contender):
    width = 100 if quick else 1000
    torch.manual_seed(0)
    base = nn.ParameterList([nn.Parameter(torch.randn(width, width)) for _ in range(TENSORS)])
    base = base.to(device)
    numel = sum(p.numel() for p in base)

    compiled = "cpp" if device == "cpu" else "cuda"
    backend = "torch" if contender.endswith("torch") else compiled
    if not contender.startswith("adam"):  # fastbnf's contenders
        if backend != "torch" and not has_kernel(device):
            pytest.skip(f"fastbnf {backend} kernel not built")
        monkeypatch.setenv("FASTBNF_BACKEND", backend)

    if contender.startswith("part-"):
        step, bytes_per_param = step_part(contender, list(base))
    else:
        step, bytes_per_param = optimizer_step(contender, base)
    bytes_moved = bytes_per_param * numel
    done = sync(device)

    def fn():
        step()
        done()

    benchmark.group = f"optim-step/{'8M' if not quick else '80k'}/{device}"
    info(
        benchmark,
        kind="optim-step",
        contender=contender,
        case="8M",
        device=device,
        size=numel,
        tensors=TENSORS,
        bytes_moved=bytes_moved,
    )
    run(benchmark, fn, quick)


def optimizer_step(contender: str, base: nn.ParameterList) -> tuple:
    r"""The ``step`` of the optimizer that ``contender`` names over ``base``, its gradients
    set, and the bytes it moves per parameter."""

    if contender.startswith("variational-adam"):
        bm = fastbnf.BayesianModel(base, init_logvar=-9.0)
        optimizer, bytes_per_param = VariationalAdam(bm, lr=1e-4, num_data=1000), 56
    else:
        fused = contender == "adam-fused"
        optimizer = torch.optim.Adam(base.parameters(), lr=1e-4, fused=fused or None)
        bytes_per_param = 28
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.randn_like(p) * 1e-2
    return optimizer.step, bytes_per_param


def step_part(contender: str, means: list[torch.Tensor]) -> tuple:
    r"""The part of the fused step that ``contender`` names, on the posterior of ``means`` at
    log-variance -9, and the bytes it moves per parameter."""

    logvars = [torch.full_like(m, -9.0) for m in means]
    if contender == "part-sample":

        def draw():
            with torch.no_grad():
                fastbnf.ops.sample(means, logvars)

        return draw, 12
    if contender == "part-variance":
        return lambda: fastbnf.ops.variance(logvars), 8
    flat = torch.cat([m.reshape(-1) for m in means])
    out = torch.empty_like(flat)
    return lambda: out.copy_(flat), 8
