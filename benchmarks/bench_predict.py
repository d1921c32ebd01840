r"""Predictions under K = 32 posterior samples: ``bm.predict(x, samples=32)`` (vmap) against a
Python loop over ``sample_model()`` (zuko's only way), without gradients."""

import torch
from torch import nn


from ._harness import (
    devices,
    info,
    linear_stack,
    numel,
    require_backend,
    run,
    sync,
    tutorial_mlp,
    wrap,
)

SAMPLES = 32


def mlp(device):
    return tutorial_mlp(device), torch.randn(64, 5, device=device)


def wide(device, width=512):
    r"""4 x (Linear 512x512 + LayerNorm) + a head: about 1.06M parameters."""

    model = nn.Sequential(
        linear_stack(width, 4, device, norm=True), nn.Linear(width, 10, device=device)
    )
    return model, torch.randn(64, width, device=device)


CASES = {"tutorial-mlp": mlp, "stack-1M": wide}


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    params, ids = [], []
    for device in devices():
        backends = ["torch", "cpp"] if device == "cpu" else ["torch", "cuda"]
        contenders = ["zuko-loop"] + [f"{b}-{m}" for b in backends for m in ("loop", "predict")]
        for case in CASES:
            for contender in contenders:
                params.append((device, case, contender))
                ids.append(f"{case}-{device}-{contender}")
    metafunc.parametrize("device,case,contender", params, ids=ids)


def test_predict(benchmark, quick, monkeypatch, device, case, contender):
    backend, _, how = contender.partition("-")
    if backend != "zuko":
        require_backend(backend, device, monkeypatch)

    base, x = CASES[case](device) if not quick or case != "stack-1M" else wide(device, 64)
    bm = wrap(backend, base)
    done = sync(device)

    if how == "predict":

        def fn():
            with torch.no_grad():
                y = bm.predict(x, samples=SAMPLES)
            done()
            return y

    else:

        def fn():
            with torch.no_grad():
                y = torch.stack([bm.sample_model()(x) for _ in range(SAMPLES)])
            done()
            return y

    benchmark.group = f"predict/{case}/{device}"
    info(
        benchmark,
        kind="predict",
        contender=contender,
        case=case,
        device=device,
        size=numel(base),
        samples=SAMPLES,
    )
    assert fn().shape[0] == SAMPLES
    run(benchmark, fn, quick)
