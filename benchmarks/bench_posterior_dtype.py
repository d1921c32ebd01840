r"""What a bfloat16 posterior (``BayesianModel(..., posterior_dtype=torch.bfloat16)``) costs in
accuracy on the tutorial's tasks.

The tutorial's sorting MLP (4 epochs of 1,024 steps of 64) and two-moons flow (8 epochs over
16,384 points in batches of 64), trained with the seed's loop and Adam, the posterior in
float32 or bfloat16 and the model in float32. ``extra_info`` holds each epoch's mean
training loss and the bytes per selected parameter of the posterior, its gradients and Adam's
moments (eight tensors of the posterior's dtype). The time pytest-benchmark records is the whole
training's. Under ``--benchmark-disable``, one short epoch.
"""

import torch
import torch.nn as nn
import torch.utils.data as data
import zuko

from functools import partial
from types import SimpleNamespace

import fastbnf

from examples.two_moons import make_model, train_step, two_moons

from ._harness import info

DTYPES = {"float32": None, "bfloat16": torch.bfloat16}


def sorting(posterior_dtype, quick: bool) -> list[float]:
    epochs, steps = (1, 64) if quick else (4, 1024)
    torch.manual_seed(0)
    net = zuko.nn.MLP(5, 5, hidden_features=(64, 64), activation=nn.ELU)
    bm = fastbnf.BayesianModel(net, init_logvar=-9.0, posterior_dtype=posterior_dtype)
    optimizer = torch.optim.Adam(bm.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(1)
    out = []
    for _ in range(epochs):
        losses = []
        for _ in range(steps):
            x = torch.randn(64, 5, generator=generator)
            y = torch.sort(x, dim=-1).values
            kl = bm.kl_divergence()
            with bm.reparameterize() as model:
                loss = (model(x) - y).square().mean() + 1e-6 * kl.float()
                loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.detach())
        out.append(torch.stack(losses).mean().item())
    return out


def moons(posterior_dtype, quick: bool) -> list[float]:
    epochs, points = (1, 1024) if quick else (8, 16384)
    torch.manual_seed(0)
    library = SimpleNamespace(
        BayesianModel=partial(fastbnf.BayesianModel, posterior_dtype=posterior_dtype)
    )
    trainset = data.TensorDataset(*two_moons(points))
    flow = make_model(library)
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-3)
    loader = data.DataLoader(
        trainset, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(2)
    )
    out = []
    for _ in range(epochs):
        losses = [train_step(flow, optimizer, x, label) for x, label in loader]
        out.append(torch.stack(losses).float().mean().item())
    return out


TASKS = {"sorting-mlp": sorting, "two-moons-nsf": moons}


def pytest_generate_tests(metafunc):
    if "task" not in metafunc.fixturenames:
        return
    params = [(task, dtype) for task in TASKS for dtype in DTYPES]
    metafunc.parametrize("task,dtype", params, ids=[f"{t}-{d}" for t, d in params])


def test_posterior_dtype(benchmark, quick, task, dtype):
    posterior_dtype = DTYPES[dtype]
    losses = benchmark.pedantic(TASKS[task], (posterior_dtype, quick), rounds=1, iterations=1)
    element = torch.finfo(posterior_dtype or torch.float32).bits // 8
    benchmark.group = f"posterior-dtype/{task}"
    info(
        benchmark,
        kind="posterior-dtype",
        case=task,
        contender=dtype,
        device="cpu",
        losses=losses,
        final_loss=losses[-1],
        posterior_bytes_per_param=8 * element,
    )
    # Training converges in every dtype: the last epoch below the first, and finite.
    assert all(torch.isfinite(torch.tensor(losses)))
    if not quick:
        assert losses[-1] < losses[0]
