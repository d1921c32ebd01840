r"""Bayesian LoRA: a mean-field Gaussian posterior over the LoRA factors of a frozen GPT-2.

Builds a small GPT-2 from a config (random weights stand in for a pretrained model: nothing is
downloaded), adds ``peft`` LoRA adapters to its attention and MLP projections, makes only the
adapters Bayesian, fine-tunes them on a synthetic next-token task (counting, ``t -> t + 1``,
over the lower half of the vocabulary) and then measures the predictive uncertainty of the next
token over posterior samples, on sequences of the task and on two kinds the fine-tuning never
showed: counting over the upper half of the vocabulary, and random tokens.

    python -m examples.bayesian_lora [--steps 300] [--optim] [--blob] [--out demo-output]

``--optim`` trains with :class:`fastbnf.optim.VariationalAdam` and a plain model's loop instead
of the seed's loop (``kl_divergence()``, ``reparameterize()``, ``torch.optim.Adam``). ``--blob``
puts the posterior on the A factors only, as BLoB does (:data:`BLOB`), instead of both.
"""

import argparse
import torch
import torch.nn as nn

from pathlib import Path
from torch import Tensor
from torch.func import functional_call

import fastbnf

from fastbnf import metrics

#: The selector of the LoRA factors in a peft model's parameter names, such as
#: ``base_model.model.transformer.h.0.attn.c_attn.lora_A.default.weight``: a mean-field
#: posterior over both factors of every adapter.
LORA = ["**.lora_A", "**.lora_B"]

#: BLoB's selection ("Bayesian Low-Rank Adaptation by Backpropagation", Wang et al., 2024): the
#: posterior on the A factors only, the B factors trained as point estimates.
BLOB = ["**.lora_A"]


def lora_gpt2(
    vocab: int = 64,
    width: int = 64,
    layers: int = 2,
    heads: int = 4,
    positions: int = 16,
    rank: int = 8,
    targets: tuple[str, ...] = ("c_attn", "c_proj", "c_fc"),
    init_range: float = 0.2,
) -> nn.Module:
    r"""Returns a peft LoRA model of a GPT-2 built from a config, its base weights frozen.

    Arguments:
        vocab: The vocabulary size.
        width: The embedding width.
        layers: The number of transformer blocks.
        heads: The number of attention heads.
        positions: The longest sequence.
        rank: The rank of the LoRA adapters.
        targets: The modules that get adapters: GPT-2's attention (``c_attn``), its output
            and MLP projections (``c_proj``, ``c_fc``).
        init_range: The standard deviation of the base weights. GPT-2's 0.02 makes tied
            embeddings so small that a frozen random base cannot give confident logits.
    """

    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab,
        n_positions=positions,
        n_embd=width,
        n_layer=layers,
        n_head=heads,
        initializer_range=init_range,
        # No dropout: samples of the posterior should be the only randomness.
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        # No key-value cache in the outputs: predict() stacks tensors only.
        use_cache=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    lora = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=list(targets),
        lora_dropout=0.0,
        fan_in_fan_out=True,  # GPT-2's Conv1D stores its weights transposed
    )
    return get_peft_model(GPT2LMHeadModel(config), lora)


def counting(n: int, low: int, high: int, length: int, generator=None) -> Tensor:
    r"""Sequences that count up by one from a random start, wrapping within ``[low, high)``."""

    start = torch.randint(low, high, (n, 1), generator=generator)
    return low + (start - low + torch.arange(length)) % (high - low)


def next_token_loss(logits: Tensor, tokens: Tensor) -> Tensor:
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())


def posterior_mean(bm: fastbnf.BayesianModel) -> dict[str, Tensor]:
    r"""The posterior means keyed by parameter name, for :func:`torch.func.functional_call`:
    the model at the mean is the deterministic one."""

    names = {name.replace(".", "-"): name for name, _ in bm.base.named_parameters()}
    return {names[key]: mean for key, mean in bm.means.items()}


def train(
    bm: fastbnf.BayesianModel,
    steps: int,
    vocab: int,
    length: int,
    batch: int = 32,
    lr: float = 1e-2,
    kl_weight: float = 1e-5,
    optim: bool = False,
) -> list[float]:
    r"""Fine-tunes the posterior of the LoRA factors on counting over the lower half of the
    vocabulary; returns the loss of each step (the data term).

    The loss is the mean next-token cross-entropy plus ``kl_weight`` times the KL to the prior
    N(0, 1): the negative ELBO per example of a data set of ``1 / kl_weight`` examples.
    """

    from tqdm.auto import tqdm

    if optim:
        optimizer = fastbnf.optim.VariationalAdam(bm, lr=lr, kl_weight=kl_weight)
    else:
        optimizer = torch.optim.Adam(bm.parameters(), lr=lr)

    losses = []
    bar = tqdm(range(steps), desc="fine-tuning", unit="step")

    for _ in bar:
        x = counting(batch, 0, vocab // 2, length)

        if optim:  # a plain model's loop: the base holds the current sample
            loss = next_token_loss(bm.base(input_ids=x).logits, x)
            loss.backward()
        else:
            kl = bm.kl_divergence()
            with bm.reparameterize() as model:
                loss = next_token_loss(model(input_ids=x).logits, x)
                (loss + kl_weight * kl).backward()

        optimizer.step()
        optimizer.zero_grad()

        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)

    if optim:
        optimizer.release()  # the frozen weights back in the base model

    return losses


def uncertainty(bm: fastbnf.BayesianModel, x: Tensor, samples: int) -> dict[str, Tensor]:
    r"""The next token's predictive uncertainty at every position, over posterior samples.

    Returns:
        ``entropy``, the predictive entropy :math:`H[\bar{p}]` of the mean over samples;
        ``mutual_info``, its epistemic part :math:`H[\bar{p}] - \overline{H[p]}` (how much the
        samples disagree); ``spread``, the standard deviation over samples of the probability
        of the most likely next token; each of shape ``(sequences, positions - 1)``.
    """

    with torch.no_grad():
        # All samples in one vmapped call: (samples, sequences, positions, vocab).
        logits = bm.predict(input_ids=x, samples=samples).logits
    # The last position's next token lies beyond the sequence: it was never trained.
    logits = logits[:, :, :-1]

    p = logits.softmax(dim=-1)
    top = metrics.predictive_probs(logits).argmax(dim=-1, keepdim=True)

    return {
        "entropy": metrics.entropy(logits),
        "mutual_info": metrics.mutual_info(logits),
        "spread": p.gather(-1, top.expand(samples, -1, -1, -1)).squeeze(-1).std(dim=0),
    }


def plot(results: dict[str, dict[str, Tensor]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))

    top = max(r["mutual_info"].max().item() for r in results.values())
    bins = torch.linspace(0.0, top, 41).tolist()

    for name, r in results.items():
        left.plot(r["entropy"].mean(dim=0), marker="o", ms=3, label=name)
        right.hist(r["mutual_info"].flatten(), bins=bins, histtype="step", lw=1.5, label=name)

    left.set_xlabel("position")
    left.set_ylabel("predictive entropy of the next token (nats)")
    left.set_title("predictive entropy, mean over sequences")
    left.legend(fontsize=8)
    right.set_xlabel("mutual information (nats): disagreement of the samples")
    right.set_ylabel("tokens")
    right.set_yscale("log")
    right.set_title("epistemic uncertainty per token")
    fig.suptitle("Bayesian LoRA on a GPT-2: fine-tuned on counting over tokens 0..V/2")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(
    path: str | Path | None,
    steps: int = 300,
    samples: int = 16,
    optim: bool = False,
    vocab: int = 64,
    width: int = 64,
    layers: int = 2,
    length: int = 16,
    seed: int = 0,
    factors: list[str] = LORA,
) -> dict[str, dict[str, float]]:
    r"""Fine-tunes a Bayesian LoRA, prints and plots its predictive uncertainty.

    Arguments:
        path: Where to save the figure, or :py:`None` for no figure.
        steps: The number of training steps.
        samples: The number of posterior samples of the predictive.
        optim: Whether to train with :class:`fastbnf.optim.VariationalAdam`.
        vocab: The vocabulary size; fine-tuning sees its lower half.
        width: The embedding width of the GPT-2.
        layers: The number of its transformer blocks.
        length: The sequence length.
        seed: The seed of the model, the training and the evaluation data.
        factors: The selection of the Bayesian factors, :data:`LORA` or :data:`BLOB`.

    Returns:
        Per evaluation set, the mean ``entropy``, ``mutual_info`` and ``spread``, and the
        ``loss`` of the posterior mean model.
    """

    torch.manual_seed(seed)
    peft_model = lora_gpt2(vocab=vocab, width=width, layers=layers, positions=length)
    # init_logvar=-6 (σ = 0.05): small against the factors, large enough that the samples
    # differ from the first step.
    bm = fastbnf.BayesianModel(peft_model, init_logvar=-6.0, include_params=factors)

    bayesian = sum(m.numel() for m in bm.means.values())
    frozen = sum(p.numel() for p in bm.base.parameters()) - bayesian
    print(
        f"GPT-2 with LoRA: {bayesian:,} Bayesian parameters in {len(bm.means)} LoRA factors, "
        f"{frozen:,} others (fastbnf backend: {fastbnf.backend('cpu')})"
    )

    losses = train(bm, steps, vocab, length, optim=optim)
    last = sum(losses[-10:]) / len(losses[-10:])
    print(f"loss (data term): first step {losses[0]:.3f}, last 10 steps {last:.3f}")

    g = torch.Generator().manual_seed(seed + 1)
    half = vocab // 2
    sets = {
        "counting, tokens < V/2 (in distribution)": counting(64, 0, half, length, g),
        "counting, tokens >= V/2 (unseen tokens)": counting(64, half, vocab, length, g),
        "random tokens < V/2 (unseen pattern)": torch.randint(half, (64, length), generator=g),
    }

    results, summary = {}, {}
    for name, x in sets.items():
        results[name] = uncertainty(bm, x, samples)
        with torch.no_grad():
            logits = functional_call(bm.base, posterior_mean(bm), (), {"input_ids": x}).logits
        summary[name] = {k: v.mean().item() for k, v in results[name].items()}
        summary[name]["loss"] = next_token_loss(logits, x).item()

    print(f"\nnext-token uncertainty over {samples} posterior samples, mean over tokens:")
    print(f"{'':44} {'entropy':>8} {'mutual info':>12} {'spread':>8} {'loss':>8}")
    for name, s in summary.items():
        print(
            f"{name:44} {s['entropy']:8.3f} {s['mutual_info']:12.4f} {s['spread']:8.4f} "
            f"{s['loss']:8.3f}"
        )

    if path is not None:
        plot(results, Path(path))

    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps")
    parser.add_argument("--samples", type=int, default=16, help="posterior samples")
    parser.add_argument("--optim", action="store_true", help="train with VariationalAdam")
    parser.add_argument("--blob", action="store_true", help="BLoB: the posterior on A only")
    parser.add_argument("--out", type=Path, default=Path("demo-output"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    import transformers

    transformers.logging.set_verbosity_error()

    path = args.out / "bayesian_lora.png"
    factors = BLOB if args.blob else LORA
    run(path, steps=args.steps, samples=args.samples, optim=args.optim, factors=factors)
    print(f"\nplot written to {path}")


if __name__ == "__main__":
    main()
