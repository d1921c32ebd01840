r"""Predictive uncertainty of the zuko tutorial's sorting MLP with ``bm.predict``.

    python examples/sorting_predict.py --out sorting_predict.png

trains the tutorial's Bayesian MLP (5 numbers in, the same 5 sorted out) briefly, then evaluates
it under 32 posterior samples in one vmapped call and plots the predictive mean and spread on a
few inputs. :func:`run` is the entry point the demo calls, with or without a trained model.
"""

import argparse
import torch
import torch.nn as nn
import zuko

from pathlib import Path
from torch import Tensor

import fastbnf


def train_sorting(steps: int = 1000, seed: int = 0) -> fastbnf.BayesianModel:
    r"""Trains the tutorial's sorting MLP: MSE to the sorted inputs + 1e-6 KL.

    Arguments:
        steps: The number of Adam steps (the tutorial runs 4096).
        seed: The seed of the initialization and the data.

    Returns:
        The trained Bayesian model.
    """

    torch.manual_seed(seed)
    net = zuko.nn.MLP(5, 5, hidden_features=(64, 64), activation=nn.ELU)
    bm = fastbnf.BayesianModel(net, init_logvar=-9.0)
    optimizer = torch.optim.Adam(bm.parameters(), lr=1e-3)

    for _ in range(steps):
        x = torch.randn(64, 5)
        y = torch.sort(x, dim=-1).values

        with bm.reparameterize(return_kl=True) as (net_rep, kl):
            loss = (net_rep(x) - y).square().mean() + 1e-6 * kl
            loss.backward()

        optimizer.step()
        optimizer.zero_grad()

    return bm


def run(
    path: str | Path,
    bm: fastbnf.BayesianModel | None = None,
    steps: int = 1000,
    inputs: int = 4,
    samples: int = 32,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    r"""Prints the predictive mean and standard deviation on a few inputs and plots them.

    Arguments:
        path: Where to save the figure.
        bm: A trained sorting model, by default one trained here for ``steps`` steps.
        steps: The number of training steps, without ``bm``.
        inputs: The number of inputs to show.
        samples: The number of posterior samples.
        seed: The seed of the inputs (and of the training, without ``bm``).

    Returns:
        The predictive mean and standard deviation, both of shape ``(inputs, 5)``.
    """

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if bm is None:
        bm = train_sorting(steps, seed)

    torch.manual_seed(seed + 1)
    x = torch.randn(inputs, 5)
    target = torch.sort(x, dim=-1).values

    with torch.no_grad():
        y = bm.predict(x, samples=samples)  # (samples, inputs, 5), one vmapped call

    mean, std = y.mean(dim=0), y.std(dim=0)

    for i in range(inputs):
        cells = "  ".join(f"{m:+.2f}±{s:.2f}" for m, s in zip(mean[i].tolist(), std[i].tolist()))
        print(
            f"input {i}: target {[round(t, 2) for t in target[i].tolist()]}\n  predicted {cells}"
        )

    fig, axes = plt.subplots(1, inputs, figsize=(3.2 * inputs, 3.2), sharey=True, squeeze=False)
    positions = torch.arange(5)

    for i, ax in enumerate(axes[0]):
        for k in range(samples):
            ax.plot(positions, y[k, i], color="tab:blue", alpha=0.08, lw=1)
        ax.errorbar(
            positions,
            mean[i],
            yerr=2 * std[i],
            fmt="o",
            color="tab:blue",
            capsize=3,
            label="mean ± 2 std",
        )
        ax.plot(positions, target[i], "kx", ms=8, label="sorted input")
        ax.set_title(f"input {i}")
        ax.set_xlabel("output index")
        ax.set_xticks(positions.tolist())

    axes[0][0].set_ylabel("value")
    axes[0][0].legend(loc="upper left", fontsize=8)
    fig.suptitle(f"Sorting MLP, predictive over {samples} posterior samples (bm.predict)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

    return mean, std


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="sorting_predict.png", help="the figure's path")
    parser.add_argument("--steps", type=int, default=1000, help="training steps")
    parser.add_argument("--samples", type=int, default=32, help="posterior samples")
    args = parser.parse_args()

    run(args.out, steps=args.steps, samples=args.samples)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
