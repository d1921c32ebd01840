r"""The whole training step of a Bayesian LoRA: a peft LoRA of a GPT-2, its factors Bayesian.

A GPT-2 built from a config (4 blocks of width 256, 4 heads, a vocabulary of 2,000: 3.7M frozen
parameters), rank-8 adapters on its attention and MLP projections (``c_attn``, ``c_proj``,
``c_fc``: 131k parameters in 32 tensors), next-token cross-entropy on 8 random sequences of 64
tokens. Forward, loss, backward and the optimizer's step, per contender (bench_train.py's
names, group ``train/lora-gpt2/<device>``):

- ``plain``: the LoRA model itself, ``Adam(fused=True)`` on its adapters: the yardstick;
- ``zuko``, ``<backend>``, ``<backend>-fused``: the adapters' posterior with
  ``include_params=["**.lora_A", "**.lora_B"]``, ``Adam(fused=True)`` on the means and
  log-variances;
- ``<backend>-optim``: :class:`fastbnf.optim.VariationalAdam` and a plain model's loop.

With ``--benchmark-disable`` the model shrinks to 2 blocks of width 32.
"""

import math
import os
import pytest
import torch

from fastbnf.optim import VariationalAdam

from ._harness import (
    backends_for,
    bayesian_contenders,
    count,
    devices,
    info,
    numel,
    peak_cuda_bytes,
    require_backend,
    run,
    split_contender,
    sync,
    train_step,
    wrap,
)

try:
    import peft  # noqa: F401
    import transformers  # noqa: F401
except ImportError:
    # CI installs them (make setup): there a missing one is a failure, not a skip.
    if os.environ.get("CI"):
        raise
    pytest.skip(
        "peft and transformers are not installed (pip install -e '.[lora]')",
        allow_module_level=True,
    )

from examples.bayesian_lora import LORA, lora_gpt2, next_token_loss

CASE = "lora-gpt2"


def lora_case(device: str, quick: bool):
    vocab, width, layers, length, batch = (100, 32, 2, 16, 4) if quick else (2000, 256, 4, 64, 8)
    model = lora_gpt2(vocab=vocab, width=width, layers=layers, positions=length, rank=8)
    tokens = torch.randint(vocab, (batch, length), device=device)
    return model.to(device), tokens


def pytest_generate_tests(metafunc):
    if "contender" not in metafunc.fixturenames:
        return
    params, ids = [], []
    for device in devices():
        optim = [f"{b}-optim" for b in backends_for(device)]
        for contender in ["plain", *bayesian_contenders(device), *optim]:
            params.append((device, contender))
            ids.append(f"{CASE}-{device}-{contender}")
    metafunc.parametrize("device,contender", params, ids=ids)


def test_lora_train(benchmark, quick, monkeypatch, device, contender):
    backend, fused = split_contender(contender)
    if backend in ("torch", "cpp", "cuda"):
        require_backend(backend, device, monkeypatch)

    base, x = lora_case(device, quick)
    lora = sum(p.numel() for p in base.parameters() if p.requires_grad)
    model = base if contender == "plain" else wrap(backend, base, LORA)
    done = sync(device)

    def objective(m):
        return next_token_loss(m(input_ids=x).logits, x)

    # The trainable parameters only, as one writes for LoRA: the adapters (plain), the
    # posterior (fastbnf), the posterior and the adapters' unused base slots (zuko).
    trained = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trained]
    if contender.endswith("-optim"):
        optimizer = VariationalAdam(model, lr=1e-3, kl_weight=1e-6)
    else:
        optimizer = torch.optim.Adam(trained, lr=1e-3, fused=True)

    step = train_step(contender, model, optimizer, objective, done)

    benchmark.group = f"train/{CASE}/{device}"
    info(
        benchmark,
        kind="train",
        contender=contender,
        case=CASE,
        device=device,
        size=numel(base),
        bayesian_size=lora,
        tensors=count(base),
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
    assert any(not torch.equal(p, b) for p, b in zip(trained, before))  # it trained

    if device == "cuda":
        info(benchmark, peak_bytes=peak_cuda_bytes(step))
