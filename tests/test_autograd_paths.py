r"""The ops' two autograd paths hold each other equal: the C++ nodes (:mod:`fastbnf.ops.native`)
and the Python :class:`torch.autograd.Function`\ s (:mod:`fastbnf.ops.functions`), in eager mode
and traced by :func:`torch.compile`.

Every path runs the same compiled kernels here, so their gradients are equal bit for bit, and
their errors say the same thing.
"""

import pytest
import torch

from fastbnf import ops
from fastbnf._backend import has_kernel
from fastbnf.ops import native

pytestmark = pytest.mark.skipif(not has_kernel("cpu"), reason="the CPU kernels are not built")

SHAPES = [(6, 5), (6,), (6,), (3, 7)]
PRIOR = ops.Prior(0.5, None, None)
STYLES = ["fused", "linked", "flat", "variance"]


@pytest.fixture(autouse=True)
def compiled_kernels(monkeypatch):
    monkeypatch.setenv("FASTBNF_BACKEND", "cpp")


def make_group(dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    means = [torch.randn(s, generator=generator, dtype=dtype) for s in SHAPES]
    logvars = [torch.rand(s, generator=generator, dtype=dtype) * 6 - 5 for s in SHAPES]
    return [t.requires_grad_() for t in means], [t.requires_grad_() for t in logvars]


def loss_of(style: str, means, logvars, x, z):
    r"""A loss of a group's sample and KL, drawn as the model draws them in each style."""

    if style == "fused":
        (w, b, c, v), kl, _ = ops.sample(means, logvars, with_kl=True, prior=PRIOR, split=True)
    elif style == "linked":
        link = ops.Link()
        kl = ops.kl(means, logvars, PRIOR, link=link)
        (w, b, c, v), _, _ = ops.sample(means, logvars, split=True, link=link)
    elif style == "flat":
        theta, kl, _ = ops.sample(means, logvars, with_kl=True, prior=PRIOR)
        w, b, c, v = ops.unflatten(theta, means)
    else:  # the local trick's variances
        w, b, c, v = ops.unflatten(ops.variance(logvars), logvars)
        kl = ops.kl(means, logvars, PRIOR)
    hidden = torch.tanh(x @ w.T + b)
    return (hidden * c).sum() + (z @ v.T).square().mean() + 0.1 * kl, kl


def run(path: str, style: str, dtype) -> tuple[list[torch.Tensor], str]:
    r"""The loss and the gradients of the means and log-variances along one path, and the name
    of the KL's node (to show which path ran)."""

    means, logvars = make_group(dtype)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4, 5, dtype=dtype, generator=generator)
    z = torch.randn(4, 7, dtype=dtype, generator=generator)
    fn = loss_of
    if path == "compiled":
        torch._dynamo.reset()
        fn = torch.compile(loss_of, fullgraph=True, backend="aot_eager")
    with pytest.MonkeyPatch.context() as patch:
        if path != "native":
            patch.setattr(native, "usable", lambda tensors: None)
        torch.manual_seed(2)
        loss, kl = fn(style, means, logvars, x, z)
        loss.backward()
    return [loss.detach(), *(t.grad for t in (*means, *logvars))], kl.grad_fn.name()


@pytest.mark.parametrize("path", ["function", "compiled"])
@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_path_gives_the_native_gradients(path, style, dtype):
    expected, native_node = run("native", style, dtype)
    got, node = run(path, style, dtype)

    # The KL's node: C++ on the native path, the Python function's on the other eager one.
    assert native_node in ("fastbnf::KLBackward", "fastbnf::SampleBackward")
    if path == "function":
        assert node in ("KLBackward", "SampleBackward")
    # A traced graph ignores links: its KL's gradient is added to the sample's by the graph, not
    # inside the kernel, which rounds the sum once less.
    exact = not (path == "compiled" and style == "linked")
    tolerance = {} if not exact else {"rtol": 0, "atol": 0}
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        torch.testing.assert_close(g, e, **tolerance, msg=f"output {i} of {path}")


def error_of(path: str, op: str, mistake: str) -> str:
    means, logvars = make_group(torch.float64)
    with pytest.MonkeyPatch.context() as patch:
        if path != "native":
            patch.setattr(native, "usable", lambda tensors: None)
        if op == "sample":
            out = ops.sample(means, logvars, split=True)[0][0].square().sum()
        elif op == "kl":
            out = ops.kl(means, logvars)
        else:
            out = ops.variance(logvars).square().sum()
        with pytest.raises(RuntimeError) as error:
            if mistake == "double backward":
                torch.autograd.grad(out, [*means, *logvars], create_graph=True, allow_unused=True)
            else:
                with torch.no_grad():
                    logvars[0].add_(1.0)
                out.backward()
    return str(error.value)


@pytest.mark.parametrize(
    "op, mistake",
    [
        ("sample", "double backward"),
        ("kl", "double backward"),
        ("variance", "double backward"),
        ("sample", "in-place change"),
        ("kl", "in-place change"),
    ],
)
def test_both_paths_refuse_alike(op, mistake):
    r"""A double backward and a parameter changed in place between forward and backward are
    refused with the same message, naming the op, on both eager paths. (A compiled graph has
    no double backward, and it checks versions as autograd does.)"""

    message = error_of("native", op, mistake)
    assert f"fastbnf::{op}" in message
    assert error_of("function", op, mistake) == message
