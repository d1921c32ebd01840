r"""The KL alone on a transformer-like group, fastbnf's kernel against the pure-PyTorch
reference and zuko, beside the time to read the same bytes.

Group ``kl/transformer-3.7M/<device>``: 51 tensors, 3.66M parameters (an embedding 2000 x 256,
12 layers of 4 matrices 256 x 256, a final norm's weight and bias), means and log-variances in
float32 (29 MB read). Contenders:

- ``cpp`` / ``cuda``: ``torch.ops.fastbnf.kl_kernel`` (the compiled KL alone);
- ``torch``: :func:`fastbnf.reference.kl`, the pure-PyTorch twin;
- ``zuko``: ``kl_divergence()`` of a ``zuko.bayesian.BayesianModel`` of the same shapes;
- ``read``: ``torch.sum`` of the means and log-variances laid end to end, one flat tensor: the
  memory floor of any KL (every byte read once, no arithmetic to speak of).
"""

import pytest
import torch

from fastbnf import reference
from fastbnf._backend import has_kernel

from ._harness import Params, devices, info, run, sync, wrap

CONTENDERS = ["zuko", "torch", "kernel", "read"]


def transformer_shapes(quick: bool) -> list[tuple[int, ...]]:
    width, vocab = (32, 100) if quick else (256, 2000)
    return [(vocab, width)] + [(width, width)] * 48 + [(width,), (width,)]


def pytest_generate_tests(metafunc):
    if "contender" in metafunc.fixturenames:
        params = [(d, c) for d in devices() for c in CONTENDERS]
        metafunc.parametrize(
            "device,contender", params, ids=[f"transformer-3.7M-{d}-{c}" for d, c in params]
        )


def test_kl(benchmark, quick, device, contender):
    shapes = transformer_shapes(quick)
    generator = torch.Generator().manual_seed(0)
    means = [(torch.randn(s, generator=generator) * 0.1).to(device) for s in shapes]
    logvars = [(torch.rand(s, generator=generator) * 4 - 9).to(device) for s in shapes]
    numel = sum(m.numel() for m in means)
    done = sync(device)
    name = contender

    if contender == "kernel":
        name = "cpp" if device == "cpu" else "cuda"
        if not has_kernel(device):
            pytest.skip(f"fastbnf {name} kernel not built")

        def fn():
            torch.ops.fastbnf.kl_kernel(means, logvars, 1.0, None, None)
            done()

    elif contender == "torch":

        def fn():
            reference.kl(means, logvars)
            done()

    elif contender == "zuko":
        bm = wrap("zuko", Params(shapes, device))

        def fn():
            with torch.no_grad():
                bm.kl_divergence()
            done()

    else:
        flat = torch.cat(
            [
                torch.cat([m.reshape(-1) for m in means]),
                torch.cat([v.reshape(-1) for v in logvars]),
            ]
        )

        def fn():
            flat.sum()
            done()

    benchmark.group = f"kl/transformer-3.7M/{device}"
    info(
        benchmark,
        kind="kl",
        contender=name,
        case="transformer-3.7M",
        device=device,
        size=numel,
        tensors=len(shapes),
        bytes_read=2 * numel * 4,
    )
    run(benchmark, fn, quick)
