r"""The input contract of the ops, the same on every backend.

One table of bad inputs runs against every backend available (the pure-PyTorch twins, the CPU
kernels, the CUDA kernels) and expects the same error type and message; the inputs the contract
accepts (other floating dtypes, non-contiguous layouts, float16 / bfloat16 groups) give the same
results as their plain equivalents; and the cases a user meets through a model work.
"""

import math

import pytest
import torch
import torch.nn as nn

import fastbnf
from fastbnf._backend import has_kernel

OPS = torch.ops.fastbnf


def backends() -> list:
    cases = [pytest.param(("torch", "cpu"), id="torch-cpu")]
    if has_kernel("cpu"):
        cases.append(pytest.param(("cpp", "cpu"), id="cpp"))
    if torch.cuda.is_available():  # marked cuda: the GPU check runs `pytest -m cuda`
        cases.append(pytest.param(("torch", "cuda"), id="torch-cuda", marks=pytest.mark.cuda))
        if has_kernel("cuda"):
            cases.append(pytest.param(("cuda", "cuda"), id="cuda", marks=pytest.mark.cuda))
    return cases


@pytest.fixture(params=backends())
def on(request, monkeypatch):
    r"""The (backend, device) pair of a test; the backend is forced."""

    backend, device = request.param
    monkeypatch.setenv("FASTBNF_BACKEND", backend)
    return backend, device


def group(device, dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    means = [torch.randn(s, generator=generator, dtype=dtype).to(device) for s in [(2, 3), (4,)]]
    logvars = [torch.rand(m.shape, generator=generator, dtype=dtype).to(device) - 3 for m in means]
    return means, logvars


def device_name(device: str) -> str:
    return str(torch.empty(0, device=device).device)


FLOATING = r"a floating dtype \(float16, bfloat16, float32 or float64\)"


def bad_inputs(device: str) -> list[tuple[str, tuple, type, str]]:
    r"""(op, arguments, error type, message) of every case of the table."""

    means, logvars = group(device)
    dev = device_name(device)
    rng = torch.tensor([1, 0], device=device)
    grad = torch.ones(10, device=device)
    one = torch.ones((), device=device)
    prior = (1.0, None, None)
    ints = [means[0], torch.zeros(4, dtype=torch.int64, device=device)]
    cases = [
        (
            "sample",
            (means, logvars[:1], None, None, False, *prior, 0),
            ValueError,
            "fastbnf::sample: means has 2 tensors but logvars has 1",
        ),
        (
            "sample",
            ([], [], None, None, False, *prior, 0),
            ValueError,
            "fastbnf::sample: the group holds no tensors",
        ),
        (
            "sample",
            (ints, logvars, None, None, False, *prior, 0),
            TypeError,
            rf"fastbnf::sample: means\[1\] has dtype torch.int64, expected {FLOATING}",
        ),
        (
            "kl",
            ([m.int() for m in means], logvars, *prior),
            TypeError,
            rf"fastbnf::kl: means\[0\] has dtype torch.int32, expected {FLOATING}",
        ),
        (
            "sample",
            (means, [logvars[0].reshape(-1), logvars[1]], None, None, False, *prior, 0),
            ValueError,
            r"fastbnf::sample: logvars\[0\] has shape \(6,\), expected \(2, 3\) like means\[0\]",
        ),
        (
            "kl",
            (means, logvars, 0.0, None, None),
            ValueError,
            "fastbnf::kl: prior_var must be positive and finite, got 0$",
        ),
        (
            "kl",
            (means, logvars, math.nan, None, None),
            ValueError,
            "fastbnf::kl: prior_var must be positive and finite, got nan",
        ),
        (
            "sample",
            (means, logvars, None, None, True, 1.0, [1.0], None, 0),
            ValueError,
            "fastbnf::sample: prior_vars has 1 entries for 2 tensors",
        ),
        (
            "kl",
            (means, logvars, 1.0, [1.0, -2.5], None),
            ValueError,
            r"fastbnf::kl: prior_vars\[1\] must be positive and finite, got -2.5",
        ),
        (
            "kl",
            (means, logvars, 1.0, None, means[:1]),
            ValueError,
            "fastbnf::kl: prior_means has 1 entries for 2 tensors",
        ),
        (
            "kl",
            (means, logvars, 1.0, None, [means[1], means[1]]),
            ValueError,
            r"fastbnf::kl: prior_means\[0\] has shape \(4,\), expected \(2, 3\) like means\[0\]",
        ),
        (
            "sample",
            (means, logvars, -1, None, False, *prior, 0),
            ValueError,
            "fastbnf::sample: n must be non-negative, got -1",
        ),
        (
            "sample",
            (means, logvars, None, torch.int32, False, *prior, 0),
            TypeError,
            (
                r"fastbnf::sample: out_dtype must be torch.float16, torch.bfloat16, torch.float32 "
                r"or the group's dtype \(torch.float32\), got torch.int32"
            ),
        ),
        (
            "sample",
            (means, logvars, None, torch.float64, False, *prior, 0),
            TypeError,
            r"out_dtype must be .* got torch.float64",
        ),
        (
            "sample_backward",
            (grad[:4], one, means, logvars, rng, True, *prior),
            ValueError,
            r"fastbnf::sample_backward: grad_theta has shape \(4,\), "
            r"expected \(10,\) or \(n, 10\)",
        ),
        (
            "sample_backward",
            (grad.int(), one, means, logvars, rng, True, *prior),
            TypeError,
            rf"fastbnf::sample_backward: grad_theta has dtype torch.int32, expected {FLOATING}",
        ),
        (
            "sample_backward",
            (grad, one, means, logvars, rng[:1], True, *prior),
            ValueError,
            (
                rf"fastbnf::sample_backward: rng_state must be an int64 tensor of shape \(2,\) on "
                rf"{dev}, got torch.int64 of shape \(1,\) on {dev}"
            ),
        ),
        (
            "sample_backward",
            (grad, one, means, logvars, rng.int(), True, *prior),
            ValueError,
            r"rng_state must be an int64 tensor of shape \(2,\) .* "
            r"got torch.int32 of shape \(2,\)",
        ),
        (
            "sample_backward",
            (grad, torch.ones(2, device=device), means, logvars, rng, True, *prior),
            ValueError,
            rf"fastbnf::sample_backward: grad_kl must hold one element on {dev}, got shape \(2,\)",
        ),
        (
            "kl_backward",
            (torch.ones(3, device=device), means, logvars, *prior),
            ValueError,
            rf"fastbnf::kl_backward: grad_kl must hold one element on {dev}, got shape \(3,\)",
        ),
        (
            "variance",
            ([logvars[0], logvars[1].long()],),
            TypeError,
            rf"fastbnf::variance: logvars\[1\] has dtype torch.int64, expected {FLOATING}",
        ),
    ]
    if device == "cuda":
        cases.append(
            (
                "kl",
                (means, [logvars[0], logvars[1].cpu()], *prior),
                ValueError,
                r"fastbnf::kl: logvars\[1\] is on cpu, expected cuda:0 like means\[0\]",
            ),
        )
    return cases


@pytest.mark.parametrize("index", range(len(bad_inputs("cpu"))))
def test_bad_input_table(on, index):
    _, device = on
    name, args, error, message = bad_inputs(device)[index]
    with pytest.raises(error, match=message):
        getattr(OPS, name)(*args)


def test_the_table_covers_every_op():
    assert {case[0] for case in bad_inputs("cpu")} == {
        "sample",
        "sample_backward",
        "kl",
        "kl_backward",
        "variance",
    }


# What the contract accepts: converted or made contiguous, with the same results.


def same_noise(fn):
    torch.manual_seed(0)
    return fn()


def test_non_contiguous_tensors_are_read_as_contiguous(on):
    _, device = on
    means, logvars = group(device)
    transposed = [t.t().contiguous().t() for t in means[:1]] + means[1:]
    lv_transposed = [t.t().contiguous().t() for t in logvars[:1]] + logvars[1:]
    assert not transposed[0].is_contiguous()
    args = (None, None, True, 0.5, None, means, 0)
    expected = same_noise(lambda: OPS.sample(means, logvars, *args))
    got = same_noise(lambda: OPS.sample(transposed, lv_transposed, *args))
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    g = torch.randn(expected[0].shape, device=device)
    backward = (g, torch.ones((), device=device))
    expected_grads = OPS.sample_backward(
        *backward, means, logvars, expected[2], True, 0.5, None, means
    )
    got_grads = OPS.sample_backward(
        *backward, transposed, lv_transposed, got[2], True, 0.5, None, transposed
    )
    for a, b in zip(got_grads, expected_grads):
        assert torch.equal(a, b)


def test_other_floating_dtypes_are_converted_to_the_groups(on):
    _, device = on
    means, logvars = group(device)
    mixed = [logvars[0].double(), logvars[1].half()]
    expected = OPS.kl(means, [logvars[0], mixed[1]], 1.0, None, [m.double() for m in means])
    got = OPS.kl(means, mixed, 1.0, None, [m.double() for m in means])
    assert got.dtype == torch.float32 and torch.equal(got, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_groups_compute_in_float32(on, dtype):
    r"""float16 / bfloat16 posteriors: the float32 results rounded once."""

    _, device = on
    means, logvars = group(device, dtype)
    wide = [m.float() for m in means], [v.float() for v in logvars]

    kl = OPS.kl(means, logvars, 0.7, None, None)
    assert kl.dtype == dtype
    assert torch.equal(kl, OPS.kl(*wide, 0.7, None, None).to(dtype))

    theta, kl, rng_state = same_noise(
        lambda: OPS.sample(means, logvars, 2, None, True, 1.0, None, None, 0)
    )
    theta32, kl32, state32 = same_noise(
        lambda: OPS.sample(*wide, 2, None, True, 1.0, None, None, 0)
    )
    assert theta.dtype == dtype and torch.equal(theta, theta32.to(dtype))
    assert torch.equal(kl, kl32.to(dtype))

    g = torch.randn(theta.shape, device=device).to(dtype)
    one = torch.ones((), device=device, dtype=dtype)
    grads = OPS.sample_backward(g, one, means, logvars, rng_state, True, 1.0, None, None)
    grads32 = OPS.sample_backward(g, one.float(), *wide, state32, True, 1.0, None, None)
    for a, b in zip(grads, grads32):
        assert a.dtype == dtype and torch.equal(a, b.to(dtype))
    assert torch.equal(OPS.variance(logvars), OPS.variance(wide[1]).to(dtype))

    # float32 samples of the 16-bit posterior (for a float32 model): the float32 results as
    # they are, and float32 gradients read as they are.
    theta_f, _, state_f = same_noise(
        lambda: OPS.sample(means, logvars, 2, torch.float32, True, 1.0, None, None, 0)
    )
    assert theta_f.dtype == torch.float32 and torch.equal(theta_f, theta32)
    g32 = torch.randn(theta.shape, device=device)
    grads_f = OPS.sample_backward(g32, one, means, logvars, state_f, True, 1.0, None, None)
    grads32 = OPS.sample_backward(g32, one.float(), *wide, state32, True, 1.0, None, None)
    for a, b in zip(grads_f, grads32):
        assert a.dtype == dtype and torch.equal(a, b.to(dtype))


# Through a model, as a user meets them.


def model_on(device, base):
    return fastbnf.BayesianModel(base.to(device))


def test_half_model(on):
    _, device = on
    bm = model_on(device, nn.Linear(3, 2).half())
    kl = bm.kl_divergence()
    assert kl.dtype == torch.float16 and torch.isfinite(kl)
    with bm.reparameterize() as module:
        module(torch.randn(4, 3, device=device).half()).float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in bm.means.values())


def test_channels_last_model(on):
    _, device = on
    torch.manual_seed(0)
    bm = model_on(device, nn.Conv2d(3, 8, 3))
    plain = same_noise(bm.sample_params)
    bm = bm.to(memory_format=torch.channels_last)
    assert not bm.means["weight"].is_contiguous()
    moved = same_noise(bm.sample_params)
    for key in plain:
        assert torch.equal(plain[key], moved[key])
    with bm.reparameterize(return_kl=True) as (module, kl):
        (module(torch.randn(1, 3, 5, 5, device=device)).sum() + kl).backward()
    assert bm.means["weight"].grad.shape == (8, 3, 3, 3)


def test_state_dict_assigned_with_other_layout_and_dtype(on):
    _, device = on
    torch.manual_seed(0)
    bm = model_on(device, nn.Linear(4, 3))
    state = bm.state_dict()
    state["means.weight"] = state["means.weight"].t().contiguous().t()  # transposed layout
    state["logvars.weight"] = state["logvars.weight"].double()
    expected_kl = bm.kl_divergence()
    bm.load_state_dict(state, assign=True)
    assert not bm.means["weight"].is_contiguous() and bm.logvars["weight"].dtype == torch.float64

    params = bm.sample_params()
    assert params["weight"].shape == (3, 4)
    torch.testing.assert_close(bm.kl_divergence(), expected_kl)
    with bm.reparameterize() as module:
        module(torch.randn(2, 4, device=device)).sum().backward()
    assert bm.logvars["weight"].grad.dtype == torch.float64
