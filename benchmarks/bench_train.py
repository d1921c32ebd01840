r"""Full training steps (forward + loss + backward + Adam), with the plain base model beside.

``<backend>-optim`` trains with :class:`fastbnf.optim.VariationalAdam` and a plain model's loop
(the base model holds the sample); the others (``plain``, zuko, the tutorial's loop) with
``torch.optim.Adam(fused=True)``, the strongest stock Adam, on the parameters they train.

The Bayesian overhead of a contender is its step time minus the ``plain`` step (the same
model, unwrapped, all parameters trained); the report gives it as a share of the step.
"""

import math

import torch
import zuko
from torch import nn

from fastbnf.optim import VariationalAdam

from ._harness import (
    backends_for,
    bayesian_contenders,
    devices,
    info,
    numel,
    peak_cuda_bytes,
    require_backend,
    run,
    split_contender,
    sync,
    train_step,
    tutorial_mlp,
    wrap,
)


def two_moons(n: int, sigma: float = 1e-1) -> tuple[torch.Tensor, torch.Tensor]:
    theta = 2 * torch.pi * torch.rand(n)
    label = (theta > torch.pi).float()
    x = torch.stack(
        (torch.cos(theta) + label - 1 / 2, torch.sin(theta) + label / 2 - 1 / 4), dim=-1
    )
    return torch.normal(x, sigma), label


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x):
        return x + torch.relu(self.norm(self.lin(x)))


class Stack(nn.Module):
    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def sorting(device, quick):
    x = torch.randn(64, 5, device=device)
    y = torch.sort(x, dim=-1).values
    return tutorial_mlp(device), ("",), (lambda m: (m(x) - y).square().mean())


def moons(device, quick):
    x, label = two_moons(64)
    x, c = x.to(device), label.unsqueeze(-1).to(device)
    flow = zuko.flows.NSF(features=2, context=1, transforms=3, hidden_features=(64, 64))
    return flow.to(device), ("**.hyper.4",), (lambda m: -m(c).log_prob(x).mean())


def partial_stack(device, quick):
    r"""8 residual blocks of width 1024 (8.4M parameters); the last two Linear are Bayesian."""

    width = 128 if quick else 1024
    x = torch.randn(64, width, device=device)
    y = torch.randn(64, width, device=device)
    model = Stack(width, 8).to(device)
    return model, ("blocks.6.lin", "blocks.7.lin"), (lambda m: (m(x) - y).square().mean())


def mlp_8x1024(device, quick):
    r"""8 Linear layers of width 1024 with ReLU (8.4M parameters), all Bayesian."""

    width = 128 if quick else 1024
    x = torch.randn(64, width, device=device)
    y = torch.randn(64, width, device=device)
    layers = []
    for i in range(8):
        layers += [nn.Linear(width, width)] + ([nn.ReLU()] if i < 7 else [])
    model = nn.Sequential(*layers).to(device)
    return model, ("",), (lambda m: (m(x) - y).square().mean())


def transformer(device, quick):
    r"""A small language model, all Bayesian: an embedding of 2,000 tokens, 12 encoder layers
    of width 256 (4 heads, feed-forward 128, no dropout) and a linear head, 5.0M parameters in
    147 tensors; next-token cross-entropy on random tokens, 16 sequences of 32."""

    width, vocab, layers = (32, 100, 2) if quick else (256, 2000, 12)
    layer = nn.TransformerEncoderLayer(
        width, 4, dim_feedforward=width // 2, dropout=0.0, batch_first=True
    )
    model = nn.Sequential(
        nn.Embedding(vocab, width),
        nn.TransformerEncoder(layer, layers, enable_nested_tensor=False),
        nn.Linear(width, vocab),
    ).to(device)
    tokens = torch.randint(vocab, (16, 33), device=device)
    x, y = tokens[:, :-1], tokens[:, 1:]

    def objective(m):
        return nn.functional.cross_entropy(m(x).flatten(0, 1), y.flatten())

    return model, ("",), objective


def mlp_100m(device, quick):
    r"""6 Linear layers of width 4096 with ReLU (100.7M parameters), all Bayesian: the GPU's
    large case (on a GPU only)."""

    width = 128 if quick else 4096
    x = torch.randn(64, width, device=device)
    y = torch.randn(64, width, device=device)
    layers = []
    for i in range(6):
        layers += [nn.Linear(width, width)] + ([nn.ReLU()] if i < 5 else [])
    model = nn.Sequential(*layers).to(device)
    return model, ("",), (lambda m: (m(x) - y).square().mean())


CASES = {
    "sorting-mlp": sorting,
    "two-moons-nsf": moons,
    "partial-stack-8M": partial_stack,
    "mlp-8x1024": mlp_8x1024,
    "transformer-5M": transformer,
    "mlp-100M": mlp_100m,
}
# Cases too large for a CPU run.
GPU_ONLY = {"mlp-100M"}


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    params, ids = [], []
    for device in devices():
        for case in CASES:
            if case in GPU_ONLY and device != "cuda":
                continue
            optim = [f"{b}-optim" for b in backends_for(device)]
            for contender in ["plain", *bayesian_contenders(device), *optim]:
                params.append((device, case, contender))
                ids.append(f"{case}-{device}-{contender}")
    metafunc.parametrize("device,case,contender", params, ids=ids)


def test_train(benchmark, quick, monkeypatch, device, case, contender):
    backend, fused = split_contender(contender)
    if backend in ("torch", "cpp", "cuda"):
        require_backend(backend, device, monkeypatch)

    base, include, objective = CASES[case](device, quick)
    done = sync(device)

    if contender == "plain":
        model = base
        bayesian = numel(base)
    else:
        model = wrap(backend, base, include)
        bayesian = sum(m.numel() for m in model.means.values())

    if contender.endswith("-optim"):
        optimizer = VariationalAdam(model, lr=1e-3, kl_weight=1e-6)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)

    step = train_step(contender, model, optimizer, objective, done)

    benchmark.group = f"train/{case}/{device}"
    info(
        benchmark,
        kind="train",
        contender=contender,
        case=case,
        device=device,
        size=numel(base),
        bayesian_size=bayesian,
        tensors=sum(1 for _ in base.parameters()),
        style=(
            "optim"
            if contender.endswith("-optim")
            else "fused"
            if fused
            else ("seed" if contender != "plain" else None)
        ),
    )

    run(benchmark, step, quick, budget_s=0.7)
    assert all(math.isfinite(p.float().sum().item()) for p in model.parameters())

    if device == "cuda":
        info(benchmark, peak_bytes=peak_cuda_bytes(step))
