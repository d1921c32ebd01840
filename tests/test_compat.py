r"""Each shim of :mod:`fastbnf._compat` against its public equivalent, and the private APIs
present on the PyTorch releases they are tested on."""

import pytest
import torch
import torch.nn as nn

import fastbnf  # noqa: F401 (declares the ops)

from fastbnf import _compat
from fastbnf.optim import adamw


def torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def test_private_apis_exist_on_the_tested_releases():
    oldest, newest = _compat.TESTED
    if not oldest <= torch_version() <= newest:
        pytest.skip(f"torch {torch.__version__} is outside the tested {oldest}..{newest}")
    missing = [name for name, api in _compat.PRIVATE.items() if api is None]
    assert not missing, f"torch {torch.__version__} lacks {missing}: the shims fall back"


def test_graph_task_id():
    assert _compat.graph_task_id() == -1
    seen = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            seen.append(_compat.graph_task_id())
            return g

    Probe.apply(torch.ones(2, requires_grad=True)).sum().backward()
    assert len(seen) == 1 and seen[0] >= 0


class Double(torch.autograd.Function):
    @staticmethod
    def forward(x):
        return 2 * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return 2 * g


def test_apply_function_is_function_apply():
    x = torch.randn(3, requires_grad=True)
    fast, usual = _compat.apply_function(Double, x), Double.apply(x)
    assert torch.equal(fast, usual) and type(fast.grad_fn) is type(usual.grad_fn)
    fast.sum().backward()
    assert torch.equal(x.grad, torch.full((3,), 2.0))
    # Under functorch transforms the usual path runs (the fast one would skip unwrapping).
    grad = torch.func.grad(lambda y: _compat.apply_function(Double, y).sum())(torch.ones(3))
    assert torch.equal(grad, torch.full((3,), 2.0))


def test_profiler_enabled():
    assert not _compat.profiler_enabled()
    with torch.profiler.profile():
        assert _compat.profiler_enabled()


def test_flatten_and_unflatten_dense():
    like = [torch.randn(2, 3), torch.randn(()), torch.randn(0, 4), torch.randn(5)]
    flat = _compat.flatten_dense(like)
    assert torch.equal(flat, torch.cat([t.reshape(-1) for t in like]))
    pieces = _compat.unflatten_dense(flat, like)
    assert [p.shape for p in pieces] == [t.shape for t in like]
    assert all(torch.equal(p, t) for p, t in zip(pieces, like))
    assert pieces[0].data_ptr() == flat.data_ptr()  # views, not copies


def test_dispatch_has_kernel():
    assert _compat.dispatch_has_kernel("aten::add.Tensor", "CPU")
    assert not _compat.dispatch_has_kernel("aten::add.Tensor", "FPGA")


def test_forward_pre_hook_by_key():
    module = nn.Linear(2, 2)
    calls = []
    _compat.set_forward_pre_hook(module, -7, lambda m, args: calls.append(m))
    module(torch.ones(2))
    _compat.set_forward_pre_hook(module, -7, None)
    module(torch.ones(2))
    assert calls == [module]
    handle = module.register_forward_pre_hook(lambda m, args: None)  # keys do not collide
    assert handle.id >= 0
    _compat.set_forward_pre_hook(module, -7, None)  # removing twice is fine


def test_swap_parameter():
    module = nn.Linear(2, 3)
    weight, sample = module.weight, torch.randn(3, 2)
    assert _compat.swap_parameter(module, "weight", sample) is weight
    assert module.weight is sample
    assert torch.equal(module(torch.ones(2)), sample.sum(1) + module.bias)
    assert _compat.swap_parameter(module, "weight", weight) is sample
    assert module.weight is weight and isinstance(module.weight, nn.Parameter)


@pytest.mark.parametrize("foreach", [True, False])
def test_adam_update_is_adamw(monkeypatch, foreach):
    if not foreach:  # the fallback of a PyTorch without the _foreach ops
        monkeypatch.setitem(_compat._foreach, "lerp_", None)
    torch.manual_seed(0)
    params = [torch.randn(5, 3, dtype=torch.float64), torch.randn(7, dtype=torch.float64)]
    expected = [p.clone().requires_grad_() for p in params]
    reference = torch.optim.AdamW(expected, lr=0.1, betas=(0.8, 0.9), weight_decay=0.01)
    moments = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    for step in range(1, 4):
        grads = [torch.randn_like(p) for p in params]
        for e, g in zip(expected, grads):
            e.grad = g.clone()
        reference.step()
        adamw.adam_update(params, grads, *moments, step, 0.1, (0.8, 0.9), 1e-8, 0.01)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p, e.detach(), rtol=0, atol=0)
