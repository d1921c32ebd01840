r"""Shared pieces of the benchmark suites: contenders, models, steps and counters.

Every case builds its own model for each contender (same seed, same shapes), so that no
contender sees another's state, and times one callable with pytest-benchmark. Groups are named
``<kind>/<case>/<device>`` so that the report can put contenders side by side and compute
ratios against ``zuko``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence

import torch
import zuko
import zuko.bayesian
import zuko.flows
import zuko.nn
from torch import Tensor, nn

import fastbnf
from fastbnf._backend import has_kernel

#: fastbnf backends, each with its seed-style (``kl_divergence()`` + ``reparameterize()``) and
#: fused (``reparameterize(return_kl=True)``) step.
FASTBNF_BACKENDS = ("torch", "cpp", "cuda")

#: Steps timed beside the contenders, as yardsticks (see bench_step.py).
YARDSTICKS = ("plain", "leaves", "randn")


def devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def backends_for(device: str) -> list[str]:
    r"""The fastbnf backends that can run on a device type (built or not: unbuilt ones skip)."""

    return ["torch", "cpp"] if device == "cpu" else ["torch", "cuda"]


def bayesian_contenders(device: str, fused: bool = True) -> list[str]:
    names = ["zuko"]
    for b in backends_for(device):
        names.append(b)
        if fused:
            names.append(b + "-fused")
    return names


def split_contender(contender: str) -> tuple[str, bool]:
    r"""``"cpp-fused"`` -> ``("cpp", True)``."""

    backend, _, mode = contender.partition("-")
    return backend, mode == "fused"


def require_backend(backend: str, device: str, monkeypatch) -> None:
    r"""Forces a fastbnf backend for the rest of the test, or skips when it is not built."""

    import pytest

    if backend in ("cpp", "cuda") and not has_kernel(device):
        pytest.skip(
            f"fastbnf {backend} kernel not built (fastbnf._backend.has_kernel({device!r}) "
            "is False)"
        )
    monkeypatch.setenv("FASTBNF_BACKEND", backend)


def sync(device: str) -> Callable[[], None]:
    if device == "cuda":
        return torch.cuda.synchronize
    return lambda: None


# Models ---------------------------------------------------------------------------------------


class Params(nn.Module):
    r"""A bag of parameters of given shapes (the overhead depends on shapes only)."""

    def __init__(self, shapes: Sequence[tuple[int, ...]], device: str = "cpu") -> None:
        super().__init__()
        self.ps = nn.ParameterList(
            [nn.Parameter(torch.randn(s, device=device) * 0.1) for s in shapes]
        )


def linear_stack(width: int, depth: int, device: str = "cpu", norm: bool = False) -> nn.Module:
    layers = []
    for _ in range(depth):
        layers.append(nn.Linear(width, width, device=device))
        if norm:
            layers.append(nn.LayerNorm(width, device=device))
    return nn.Sequential(*layers)


def tutorial_mlp(device: str = "cpu") -> nn.Module:
    return zuko.nn.MLP(5, 5, hidden_features=(64, 64), activation=nn.ELU).to(device)


def mlp_of_size(n: int, device: str = "cpu") -> nn.Module:
    r"""Six square Linear layers (12 tensors) with about ``n`` parameters in all."""

    width = max(2, round(math.sqrt(n / 6)))
    return linear_stack(width, 6, device)


def bag(tensors: int, total: int, device: str = "cpu") -> nn.Module:
    return Params([(max(1, total // tensors),)] * tensors, device)


def numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count(module: nn.Module) -> int:
    return sum(1 for _ in module.parameters())


# Contenders -----------------------------------------------------------------------------------


def wrap(contender: str, base: nn.Module, include: Sequence[str] = ("",)) -> nn.Module:
    if contender == "zuko":
        return zuko.bayesian.BayesianModel(base, include_params=include)
    return fastbnf.BayesianModel(base, include_params=include)


def places(module: nn.Module) -> list[tuple[nn.Module, str]]:
    r"""``(module, attribute)`` of every parameter, to read the sampled ones inside a context."""

    out = []
    for name, _ in module.named_parameters():
        prefix, _, attribute = name.rpartition(".")
        out.append((module.get_submodule(prefix), attribute))
    return out


class LinearLoss:
    r"""``<w, cat(theta_i)>`` with a fixed random ``w``: a loss linear in the samples whose own
    cost is small (one cat and one dot, not one dot per tensor), so that the step measures the
    Bayesian overhead rather than the loss.

    The samples are flattened with :meth:`~torch.Tensor.flatten`, which returns a 1-d tensor
    itself: ``reshape(-1)`` would add a view node per tensor, whose forward and backward cost
    about 10 µs a tensor here, on both sides of the comparison (5 ms of a 500-tensor step).
    """

    def __init__(self, module: nn.Module) -> None:
        self.places = places(module)
        params = [getattr(m, a) for m, a in self.places]
        devices = {p.device for p in params}
        assert len(devices) == 1, "LinearLoss takes a model on one device"
        device = devices.pop()
        generator = torch.Generator(device).manual_seed(0)
        self.w = torch.randn(sum(p.numel() for p in params), generator=generator, device=device)

    def __call__(self) -> Tensor:
        return self.of([m._parameters[a] for m, a in self.places])

    def of(self, thetas: Sequence[Tensor]) -> Tensor:
        r"""The loss of given samples, in the order of the model's parameters."""

        return torch.cat([t.flatten() for t in thetas]) @ self.w


class _Leaves(torch.autograd.Function):
    r"""The autograd bookkeeping of a Bayesian step with no sampling or KL in it: one node
    from the posterior's leaves to per-tensor samples (views of a fixed buffer), whose
    backward hands each leaf a gradient (views of another)."""

    @staticmethod
    def forward(ctx, samples, grads, *leaves):
        ctx.grads = grads
        return tuple(samples)

    @staticmethod
    def backward(ctx, *_):
        flat, leaves = ctx.grads
        return None, None, *fastbnf._flat.views(flat, leaves)


def leaves_step(base: nn.Module, loss_fn: LinearLoss, done: Callable[[], None]) -> Callable:
    r"""The ``leaves`` yardstick: the step of a model with zuko's parameters (a mean and a
    log-variance per tensor) whose sampling and KL cost nothing. What remains is the loss and
    what autograd does per tensor: one leaf gradient per mean and log-variance, twice as many
    as the plain step's. No design that keeps zuko's parameters can be faster."""

    bm = fastbnf.BayesianModel(base)
    leaves = [p for p in bm.parameters() if p.requires_grad]
    shapes = list(base.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in shapes])
    grads = (torch.zeros(sum(p.numel() for p in leaves), device=flat.device), leaves)

    def step():
        for p in leaves:
            p.grad = None
        samples = fastbnf._flat.views(flat, shapes)
        thetas = super(torch.autograd.Function, _Leaves).apply(samples, grads, *leaves)
        loss_fn.of(thetas).backward()
        done()

    return step


def overhead_step(contender: str, base: nn.Module, device: str) -> tuple[Callable, nn.Module]:
    r"""One step of the Bayesian overhead: KL + sample + a linear loss + backward."""

    done = sync(device)
    loss_fn = LinearLoss(base)

    if contender == "plain":
        params = list(base.parameters())

        def step():
            for p in params:
                p.grad = None
            loss_fn().backward()
            done()

        return step, base

    if contender == "leaves":
        return leaves_step(base, loss_fn, done), base

    if contender == "randn":
        n = numel(base)

        def step():
            torch.randn(n, device=device)
            done()

        return step, base

    bm = wrap(contender.partition("-")[0] if contender != "zuko" else "zuko", base)
    params = [p for p in bm.parameters() if p.requires_grad]
    fused = contender.endswith("-fused")

    if fused:

        def step():
            for p in params:
                p.grad = None
            with bm.reparameterize(return_kl=True) as (_, kl):
                loss = loss_fn() + 1e-6 * kl
                loss.backward()
            done()

    else:

        def step():
            for p in params:
                p.grad = None
            kl = bm.kl_divergence()
            with bm.reparameterize():
                loss = loss_fn() + 1e-6 * kl
                loss.backward()
            done()

    return step, bm


def train_step(
    contender: str, model: nn.Module, optimizer, objective: Callable, done: Callable[[], None]
) -> Callable[[], None]:
    r"""One whole training step of a contender (forward, loss, backward, optimizer):
    ``<backend>-optim`` a plain model's loop on the base model, which holds the sample
    (:class:`fastbnf.optim.VariationalAdam`); ``plain`` the plain model's; ``*-fused``
    ``reparameterize(return_kl=True)``; the others the seed's loop. ``objective(model)`` is the
    data loss; the KL's weight is 1e-6."""

    _, fused = split_contender(contender)
    if contender.endswith("-optim"):

        def step():
            optimizer.zero_grad(set_to_none=True)
            objective(model.base).backward()
            optimizer.step()
            done()

    elif contender == "plain":

        def step():
            optimizer.zero_grad(set_to_none=True)
            objective(model).backward()
            optimizer.step()
            done()

    elif fused:

        def step():
            optimizer.zero_grad(set_to_none=True)
            with model.reparameterize(return_kl=True) as (m, kl):
                loss = objective(m) + 1e-6 * kl
                loss.backward()
            optimizer.step()
            done()

    else:

        def step():
            optimizer.zero_grad(set_to_none=True)
            kl = model.kl_divergence()
            with model.reparameterize() as m:
                loss = objective(m) + 1e-6 * kl
                loss.backward()
            optimizer.step()
            done()

    return step


def forward_only(bm: nn.Module, fused: bool, loss_fn: LinearLoss):
    r"""KL + sample + loss, without backward; returns the loss."""

    if fused:
        with bm.reparameterize(return_kl=True) as (_, kl):
            return loss_fn() + 1e-6 * kl
    kl = bm.kl_divergence()
    with bm.reparameterize():
        return loss_fn() + 1e-6 * kl


def saved_bytes(bm: nn.Module, fused: bool, loss_fn: LinearLoss) -> int:
    r"""Bytes autograd keeps for the backward of the sampling and the KL.

    Counted with :func:`torch.autograd.graph.saved_tensors_hooks` over unique storages, leaving
    out every parameter (leaves) of the model; the loss is built outside the hooks.
    """

    leaves = {p.untyped_storage().data_ptr() for p in bm.parameters()}
    kept: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in leaves:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if fused:
            context = bm.reparameterize(return_kl=True)
            _, kl = context.__enter__()
        else:
            kl = bm.kl_divergence()
            context = bm.reparameterize()
            context.__enter__()

    try:
        loss = loss_fn() + 1e-6 * kl
    finally:
        context.__exit__(None, None, None)

    loss.backward()
    return sum(kept.values())


def peak_cuda_bytes(step: Callable[[], None]) -> int:
    r"""Peak CUDA memory above the current allocation during one call of ``step``."""

    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def run(benchmark, fn: Callable[[], None], quick: bool, budget_s: float = 1.0) -> None:
    r"""Times ``fn`` with a fixed number of rounds fitted to a time budget.

    One warm-up call is timed to choose the rounds (5 to 200; 3 when a call takes over 0.25 s),
    so that a 25M-parameter case and a 5k-parameter case both cost about ``budget_s``. In
    ``--benchmark-disable`` mode ``fn`` runs once.
    """

    if quick:
        benchmark(fn)
        return

    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    least = 3 if first > 0.25 else 5
    rounds = int(min(200, max(least, budget_s / max(first, 1e-6))))
    iterations = 1 if first > 1e-3 else 10
    # The timed first call already warmed up a slow case.
    warmup = 0 if first > 0.1 else 1
    benchmark.pedantic(fn, rounds=rounds, iterations=iterations, warmup_rounds=warmup)


def info(benchmark, **fields) -> None:
    benchmark.extra_info.update(fields)


def machine() -> dict:
    r"""Machine and versions, recorded in the JSON by ``conftest.py``."""

    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        names = [
            ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")
        ]
        cpu = names[0] if names else cpu
        if " avx512f" in text:
            cpu += " (AVX-512)"
        elif " avx2" in text:
            cpu += " (AVX2)"
    except OSError:
        pass

    out = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "zuko": zuko.__version__,
        "fastbnf": fastbnf.__version__,
        "backend_cpu": fastbnf.backend("cpu") if not os.environ.get("FASTBNF_BACKEND") else None,
        "cpp_kernel": has_kernel("cpu"),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cuda_kernel": has_kernel("cuda") if torch.cuda.is_available() else False,
        "cuda": torch.version.cuda,
    }
    return out
