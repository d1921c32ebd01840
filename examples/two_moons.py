r"""The two-moons Bayesian flow of zuko's "Bayesian flows" tutorial, trained with fastbnf.

Trains the Bayesian NSF, prints the loss of each epoch, times the same training step with
zuko.bayesian and fastbnf side by side, and writes plots into a folder (``demo-output/``); then
shows the predictive uncertainty of the tutorial's sorting MLP (``BayesianModel.predict``).

    python -m examples.two_moons [--epochs 8] [--out demo-output]
"""

import argparse
import matplotlib
import numpy as np
import sys
import time
import torch
import torch.utils.data as data
import zuko
import zuko.bayesian

from pathlib import Path
from torch import Tensor

import fastbnf

from examples import sorting_predict

matplotlib.use("Agg")

import matplotlib.pyplot as plt


def two_moons(n: int, sigma: float = 1e-1) -> tuple[Tensor, Tensor]:
    theta = 2 * torch.pi * torch.rand(n)
    label = (theta > torch.pi).float()

    x = torch.stack(
        (
            torch.cos(theta) + label - 1 / 2,
            torch.sin(theta) + label / 2 - 1 / 4,
        ),
        axis=-1,
    )

    return torch.normal(x, sigma), label


def make_model(library) -> torch.nn.Module:
    flow = zuko.flows.NSF(features=2, context=1, transforms=3, hidden_features=(64, 64))
    return library.BayesianModel(flow, init_logvar=-9.0, include_params=["**.hyper.4"])


def train_step(bayes_flow, optimizer, x: Tensor, label: Tensor) -> Tensor:
    c = label.unsqueeze(dim=-1)

    kl = bayes_flow.kl_divergence()

    with bayes_flow.reparameterize() as flow_rep:
        loss = -flow_rep(c).log_prob(x).mean()
        loss = loss + 1e-6 * kl
        loss.backward()

    optimizer.step()
    optimizer.zero_grad()

    return loss.detach()


def progress(epoch: int, step: int, total: int, loss: float) -> None:
    filled = 30 * step // total
    bar = "#" * filled + "-" * (30 - filled)
    print(f"\r({epoch}) [{bar}] {step}/{total} loss {loss:.4f}", end="", file=sys.stderr)


def train(bayes_flow, epochs: int) -> None:
    trainset = data.TensorDataset(*two_moons(16384))
    trainloader = data.DataLoader(trainset, batch_size=64, shuffle=True)
    optimizer = torch.optim.Adam(bayes_flow.parameters(), lr=1e-3)

    for epoch in range(epochs):
        losses = []

        for step, (x, label) in enumerate(trainloader, 1):
            losses.append(train_step(bayes_flow, optimizer, x, label))
            if sys.stderr.isatty() and (step % 16 == 0 or step == len(trainloader)):
                progress(epoch, step, len(trainloader), losses[-1].item())

        losses = torch.stack(losses)
        print(f"\r({epoch})", losses.mean().item(), "±", losses.std().item(), " " * 40)


def step_time(library, steps: int = 300, warmup: int = 30) -> float:
    r"""Returns the median time of the tutorial's training step, in seconds."""

    torch.manual_seed(0)
    bayes_flow = make_model(library)
    optimizer = torch.optim.Adam(bayes_flow.parameters(), lr=1e-3)
    x, label = two_moons(64)
    times = []

    for i in range(warmup + steps):
        start = time.perf_counter()
        train_step(bayes_flow, optimizer, x, label)
        if i >= warmup:
            times.append(time.perf_counter() - start)

    return float(np.median(times))


def plot_samples(bayes_flow, path: Path) -> None:
    c = torch.tensor([0.0])
    fig, axs = plt.subplots(1, 2, figsize=(9.6, 4.8))

    for ax, title in zip(axs, ("posterior draw A", "posterior draw B")):
        with torch.no_grad():
            samples = bayes_flow.sample_model()(c).sample((16384,))
        ax.hist2d(*samples.T, bins=64, range=((-2, 2), (-2, 2)))
        ax.set_title(title)

    fig.suptitle("Two moons, top-moon label: samples from two sampled flows")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_logvars(bayes_flow, path: Path) -> None:
    log_vars = np.concatenate([v.numpy(force=True).flatten() for v in bayes_flow.logvars.values()])

    fig = plt.figure(figsize=(4.8, 4.8))
    plt.hist(log_vars, bins=64)
    plt.xlabel("learned log-variance")
    plt.ylabel("parameters")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("demo-output"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    print(f"fastbnf backend on cpu: {fastbnf.backend('cpu')}")

    torch.manual_seed(0)
    bayes_flow = make_model(fastbnf)
    train(bayes_flow, args.epochs)

    zuko_time, fastbnf_time = step_time(zuko.bayesian), step_time(fastbnf)
    print(
        f"median training step: zuko.bayesian {1e3 * zuko_time:.2f} ms, "
        f"fastbnf {1e3 * fastbnf_time:.2f} ms ({zuko_time / fastbnf_time:.1f}x)"
    )

    plot_samples(bayes_flow, args.out / "two_moons_samples.png")
    plot_logvars(bayes_flow, args.out / "two_moons_logvars.png")

    print("\nthe tutorial's sorting MLP, predictive mean ± std over 32 posterior samples:")
    sorting_predict.run(args.out / "sorting_predictive.png")
    print(f"plots written to {args.out}/")


if __name__ == "__main__":
    main()
