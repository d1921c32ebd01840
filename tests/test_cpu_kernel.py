r"""Tests of the fused CPU kernel ops ``fastbnf::<name>_kernel`` (csrc/cpu).

Values against the pure-PyTorch twins in :mod:`fastbnf.reference`; the noise stream bit for bit
against a NumPy Philox4x32-10 written here; determinism across thread counts; statistics of the
noise; edge cases; errors; and ``torch.library.opcheck``.
"""

import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import fastbnf  # noqa: F401 (declares the ops)

from fastbnf import reference
from fastbnf._backend import has_kernel
from philox_twin import numpy_normals, philox4x32_10

pytestmark = pytest.mark.skipif(not has_kernel("cpu"), reason="CPU kernel not built")

K = torch.ops.fastbnf

SHAPES = [(7, 3), (), (0, 4), (129,), (2, 3, 5), (1,)]


def make_group(dtype=torch.float32, shapes=SHAPES, seed=0, lv_range=(-6.0, 2.0)):
    generator = torch.Generator().manual_seed(seed)
    means = [torch.randn(s, generator=generator, dtype=dtype) for s in shapes]
    lo, hi = lv_range
    logvars = [torch.rand(s, generator=generator, dtype=dtype) * (hi - lo) + lo for s in shapes]
    return means, logvars


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def sigma_of(logvars):
    return reference.softclip(flat(logvars)).div(2).exp()


def seed_of(rng_state):
    seed, offset = rng_state.tolist()
    return seed, offset


@pytest.mark.parametrize(
    "counter, key, expected",
    [
        ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
        (
            [0xFFFFFFFF] * 4,
            [0xFFFFFFFF] * 2,
            [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD],
        ),
        (
            [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344],
            [0xA4093822, 0x299F31D0],
            [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1],
        ),
    ],
)
def test_numpy_philox_known_answers(counter, key, expected):
    r"""The Random123 known-answer vectors of Philox4x32-10."""

    out = philox4x32_10(*[np.array([c]) for c in counter], *key)
    assert [int(x[0]) for x in out] == expected


def standard_group(sizes, dtype=torch.float32):
    means = [torch.zeros(s, dtype=dtype) for s in sizes]
    logvars = [torch.zeros(s, dtype=dtype) for s in sizes]
    return means, logvars


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**63 + 977, 2**64 - 1])
@pytest.mark.parametrize("n", [None, 3])
def test_stream_bit_for_bit(seed, n):
    r"""With mu = 0 and logvar = 0, theta is the noise; it equals the NumPy Philox stream."""

    # An odd total so that the samples of n > 1 start mid-block.
    means, logvars = standard_group([(1000,), (0,), (), (37, 3), (2001,)])
    torch.manual_seed(seed % 2**63)
    theta, _, rng_state = K.sample_kernel(means, logvars, n, None, False, 1.0, None, None, 0)
    s, offset = seed_of(rng_state)
    assert offset == 0
    flat_theta = theta.reshape(-1).double().numpy()
    j = np.arange(flat_theta.size)
    np.testing.assert_allclose(flat_theta, numpy_normals(s, offset, j), rtol=0, atol=1e-5)


def test_stream_follows_rng_state():
    r"""Backward regenerates the noise from rng_state alone: a forged state gives the NumPy
    stream of that state (offsets and high seed words included)."""

    means, logvars = standard_group([(513,), (5, 7)])
    N = 513 + 35
    for seed, offset in [(7, 0), (-3, 5), (2**40 + 3, 2**33 + 1)]:
        state = torch.tensor([seed, offset], dtype=torch.int64)
        # grad_theta = one-hot rows would be slow; with mu = logvar = 0, sigma = 1 and
        # grad_logvar = 0.5 * g * eps, so g = 2 gives eps.
        g = torch.full((N,), 2.0)
        _, grad_logvar = K.sample_backward_kernel(
            g, torch.tensor(0.0), means, logvars, state, False, 1.0, None, None
        )
        expected = numpy_normals(seed, offset, np.arange(N))
        np.testing.assert_allclose(grad_logvar.double().numpy(), expected, rtol=0, atol=1e-5)


def test_seed_comes_from_default_generator():
    means, logvars = make_group()
    torch.manual_seed(3)
    a = K.sample_kernel(means, logvars, None, None, True, 1.0, None, None, 0)
    b = K.sample_kernel(means, logvars, None, None, True, 1.0, None, None, 0)
    torch.manual_seed(3)
    c = K.sample_kernel(means, logvars, None, None, True, 1.0, None, None, 0)
    assert torch.equal(a[0], c[0]) and torch.equal(a[2], c[2])
    assert not torch.equal(a[0], b[0])
    with torch.random.fork_rng():
        d = K.sample_kernel(means, logvars, None, None, True, 1.0, None, None, 0)
    e = K.sample_kernel(means, logvars, None, None, True, 1.0, None, None, 0)
    assert torch.equal(d[0], e[0])
    # The stream number is folded into the seed.
    torch.manual_seed(3)
    f = K.sample_kernel(means, logvars, None, None, True, 1.0, None, None, 5)
    mix = 0x9E3779B97F4A7C15
    expected = ((a[2][0].item() % 2**64) ^ (5 * mix % 2**64)) % 2**64
    assert f[2][0].item() % 2**64 == expected
    assert not torch.equal(a[0], f[0])


# --------------------------------------------------------------------------------------------
# Values against the reference twins and the closed forms.

PRIORS = [
    dict(prior_var=1.0, prior_vars=None, prior_means=False),
    dict(prior_var=0.37, prior_vars=None, prior_means=False),
    dict(prior_var=1.0, prior_vars=True, prior_means=True),
]


def prior_args(means, prior):
    prior_vars = [0.5 + 0.25 * i for i in range(len(means))] if prior["prior_vars"] else None
    prior_means = None
    if prior["prior_means"]:
        generator = torch.Generator().manual_seed(9)
        prior_means = [torch.randn(m.shape, generator=generator, dtype=m.dtype) for m in means]
    return prior["prior_var"], prior_vars, prior_means


def tolerances(dtype):
    return dict(rtol=5e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("prior", PRIORS)
def test_kl_matches_reference(dtype, prior):
    means, logvars = make_group(dtype, lv_range=(-30.0, 30.0))
    args = prior_args(means, prior)
    kl = K.kl_kernel(means, logvars, *args)
    expected = reference.kl(means, logvars, *args)
    assert kl.dtype == dtype and kl.shape == ()
    torch.testing.assert_close(kl, expected, **tolerances(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("prior", PRIORS)
def test_kl_backward_matches_reference(dtype, prior):
    means, logvars = make_group(dtype, lv_range=(-30.0, 30.0))
    args = prior_args(means, prior)
    grad_kl = torch.tensor(0.7, dtype=dtype)
    out = K.kl_backward_kernel(grad_kl, means, logvars, *args)
    expected = reference.kl_backward(grad_kl, means, logvars, *args)
    for a, b in zip(out, expected):
        assert a.dtype == dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, **tolerances(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_variance_matches_reference(dtype):
    _, logvars = make_group(dtype, lv_range=(-60.0, 60.0))
    out = K.variance_kernel(logvars)
    torch.testing.assert_close(out, reference.variance(logvars), **tolerances(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [None, 0, 1, 4])
@pytest.mark.parametrize("with_kl", [True, False])
@pytest.mark.parametrize("prior", PRIORS)
def test_sample_matches_reference(dtype, n, with_kl, prior):
    means, logvars = make_group(dtype)
    args = prior_args(means, prior)
    theta, kl, rng_state = K.sample_kernel(means, logvars, n, None, with_kl, *args, 0)
    ref_theta, ref_kl, ref_state = reference.sample(means, logvars, n, None, with_kl, *args, 0)

    assert theta.shape == ref_theta.shape and theta.dtype == ref_theta.dtype
    assert kl.shape == () and kl.dtype == dtype
    assert rng_state.shape == ref_state.shape == (2,) and rng_state.dtype == torch.int64
    torch.testing.assert_close(kl, ref_kl, **tolerances(dtype))

    # theta = mu + sigma * eps with the stream's eps.
    seed, offset = seed_of(rng_state)
    eps = numpy_normals(seed, offset, np.arange(theta.numel()))
    eps = torch.from_numpy(eps).reshape(theta.shape).to(dtype)
    expected = flat(means) + sigma_of(logvars) * eps
    torch.testing.assert_close(theta, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [None, 1, 3])
@pytest.mark.parametrize("with_kl", [True, False])
@pytest.mark.parametrize("prior", PRIORS)
def test_sample_backward_is_exact(dtype, n, with_kl, prior):
    r"""Gradients against the closed form, with eps recovered from the forward's theta."""

    means, logvars = make_group(dtype)
    args = prior_args(means, prior)
    theta, _, rng_state = K.sample_kernel(means, logvars, n, None, with_kl, *args, 0)
    g = torch.randn(theta.shape, dtype=dtype)
    lam = 0.3
    grad_mu, grad_lv = K.sample_backward_kernel(
        g, torch.tensor(lam, dtype=dtype), means, logvars, rng_state, with_kl, *args
    )

    mu, lv = flat(means).double(), flat(logvars).double()
    sigma = reference.softclip(lv).div(2).exp()
    eps = (theta.double() - mu) / sigma
    g = g.double()
    g_sum, ge_sum = (g.sum(0), (g * eps).sum(0)) if n else (g, g * eps)
    exp_mu = g_sum
    exp_lv = reference.softclip_grad(lv) * 0.5 * sigma * ge_sum
    if with_kl:
        kl_mu, kl_lv = reference.kl_backward(
            torch.tensor(lam, dtype=torch.float64),
            [m.double() for m in means],
            [v.double() for v in logvars],
            args[0],
            args[1],
            None if args[2] is None else [m.double() for m in args[2]],
        )
        exp_mu, exp_lv = exp_mu + kl_mu, exp_lv + kl_lv

    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-10)
    assert grad_mu.dtype == grad_lv.dtype == dtype
    torch.testing.assert_close(grad_mu.double(), exp_mu, **tol)
    torch.testing.assert_close(grad_lv.double(), exp_lv, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("prior", PRIORS)
def test_sample_backward_kl_part_matches_reference(dtype, prior):
    r"""With a zero sample gradient the backward is the KL's, which the reference gives exactly."""

    means, logvars = make_group(dtype, lv_range=(-30.0, 30.0))
    args = prior_args(means, prior)
    _, _, rng_state = K.sample_kernel(means, logvars, 2, None, True, *args, 0)
    g = torch.zeros(2, sum(m.numel() for m in means), dtype=dtype)
    grad_kl = torch.tensor(1.3, dtype=dtype)
    out = K.sample_backward_kernel(g, grad_kl, means, logvars, rng_state, True, *args)
    expected = reference.kl_backward(grad_kl, means, logvars, *args)
    for a, b in zip(out, expected):
        torch.testing.assert_close(a, b, **tolerances(dtype))


def test_grad_kl_ignored_without_kl():
    means, logvars = make_group()
    _, _, rng_state = K.sample_kernel(means, logvars, None, None, False, 1.0, None, None, 0)
    g = torch.randn(sum(m.numel() for m in means))
    a = K.sample_backward_kernel(g, torch.tensor(5.0), means, logvars, rng_state, False, 1.0, None, None)
    b = K.sample_backward_kernel(g, torch.tensor(0.0), means, logvars, rng_state, False, 1.0, None, None)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    _, kl, _ = K.sample_kernel(means, logvars, None, None, False, 1.0, None, None, 0)
    assert kl.shape == () and kl.item() == 0.0


# --------------------------------------------------------------------------------------------
# Low-precision outputs.


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [None, 2])
def test_low_precision_output(out_dtype, n):
    r"""theta in bf16/fp16 is the fp32 theta rounded once; the backward reads that gradient."""

    means, logvars = make_group(torch.float32)
    torch.manual_seed(4)
    theta32, kl32, state32 = K.sample_kernel(means, logvars, n, None, True, 1.0, None, None, 0)
    torch.manual_seed(4)
    theta, kl, state = K.sample_kernel(means, logvars, n, out_dtype, True, 1.0, None, None, 0)
    assert theta.dtype == out_dtype and kl.dtype == torch.float32
    assert torch.equal(state, state32) and torch.equal(kl, kl32)
    assert torch.equal(theta, theta32.to(out_dtype))

    g = torch.randn(theta.shape).to(out_dtype)
    grad_kl = torch.tensor(0.5)
    low = K.sample_backward_kernel(g, grad_kl, means, logvars, state, True, 1.0, None, None)
    full = K.sample_backward_kernel(g.float(), grad_kl, means, logvars, state, True, 1.0, None, None)
    assert low[0].dtype == low[1].dtype == torch.float32
    assert torch.equal(low[0], full[0]) and torch.equal(low[1], full[1])


def test_low_precision_special_values():
    r"""The kernel's fp32 -> bf16/fp16 rounding is PyTorch's: nearest even, overflow, NaN."""

    values = torch.tensor(
        [0.0, -0.0, 1.0, 1.00390625, 1.01171875, 3.0e38, -3.0e38, 65504.0, 65520.0, 1e-8, 6e-8,
         float("inf"), float("-inf"), float("nan")]
    )
    values = torch.cat([values, torch.randn(4000) * 100])
    means = [values]
    logvars = [torch.full_like(values, -1e30)]  # softclip -> -18: sigma ~ 1.2e-4
    for out_dtype in (torch.bfloat16, torch.float16):
        torch.manual_seed(0)
        theta32, _, _ = K.sample_kernel(means, logvars, None, None, False, 1.0, None, None, 0)
        torch.manual_seed(0)
        theta, _, _ = K.sample_kernel(means, logvars, None, out_dtype, False, 1.0, None, None, 0)
        torch.testing.assert_close(theta, theta32.to(out_dtype), rtol=0, atol=0, equal_nan=True)


# --------------------------------------------------------------------------------------------
# Determinism across thread counts.


def big_group(dtype=torch.float32):
    # Sizes that cut chunks at odd places, about 40 chunks in all.
    return make_group(dtype, shapes=[(70001,), (3,), (), (333, 257), (0,), (5000,)], seed=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [None, 2])
def test_same_results_for_any_thread_count(dtype, n):
    means, logvars = big_group(dtype)
    prior_means = [torch.randn_like(m) for m in means]
    args = (0.8, None, prior_means)
    results = []
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            torch.manual_seed(11)
            theta, kl, state = K.sample_kernel(means, logvars, n, None, True, *args, 0)
            g = torch.linspace(-1, 1, theta.numel(), dtype=dtype).reshape(theta.shape)
            grads = K.sample_backward_kernel(
                g, torch.tensor(0.3, dtype=dtype), means, logvars, state, True, *args
            )
            kl_only = K.kl_kernel(means, logvars, *args)
            results.append((theta, kl, state, *grads, kl_only))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
    assert torch.equal(results[0][1], results[0][-1])  # same KL with or without sampling


def test_same_results_with_one_openmp_thread():
    r"""A fresh process with OMP_NUM_THREADS=1 gives bitwise the same theta and KL."""

    means, logvars = big_group()
    torch.manual_seed(5)
    theta, kl, _ = K.sample_kernel(means, logvars, None, None, True, 1.0, None, None, 0)
    script = textwrap.dedent(
        """
        import sys, torch, fastbnf
        from fastbnf._backend import has_kernel
        assert has_kernel("cpu")
        sys.path.insert(0, sys.argv[1])
        from test_cpu_kernel import big_group
        means, logvars = big_group()
        torch.manual_seed(5)
        theta, kl, _ = torch.ops.fastbnf.sample_kernel(
            means, logvars, None, None, True, 1.0, None, None, 0)
        torch.save((theta, kl, torch.get_num_threads()), sys.argv[2])
        """
    )
    out = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"fastbnf_omp1_{os.getpid()}.pt")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(
        [sys.executable, "-c", script, os.path.dirname(__file__), out], check=True, env=env
    )
    try:
        theta1, kl1, threads1 = torch.load(out)
    finally:
        os.remove(out)
    assert threads1 == 1
    assert torch.equal(theta, theta1) and torch.equal(kl, kl1)


def test_generic_path_draws_the_same_stream():
    r"""FASTBNF_CPU_ISA=generic forces the kernels' baseline path (no AVX2): the same stream and
    results."""

    means, logvars = big_group()
    torch.manual_seed(5)
    theta, kl, state = K.sample_kernel(means, logvars, 3, None, True, 1.0, None, None, 0)
    g = torch.linspace(-1, 1, theta.numel()).reshape(theta.shape)
    grads = K.sample_backward_kernel(g, torch.tensor(0.3), means, logvars, state, True, 1.0, None, None)
    script = textwrap.dedent(
        """
        import sys, torch, fastbnf
        from fastbnf._backend import has_kernel
        assert has_kernel("cpu")
        sys.path.insert(0, sys.argv[1])
        from test_cpu_kernel import big_group
        K = torch.ops.fastbnf
        means, logvars = big_group()
        torch.manual_seed(5)
        theta, kl, state = K.sample_kernel(means, logvars, 3, None, True, 1.0, None, None, 0)
        g = torch.linspace(-1, 1, theta.numel()).reshape(theta.shape)
        grads = K.sample_backward_kernel(
            g, torch.tensor(0.3), means, logvars, state, True, 1.0, None, None)
        variance = K.variance_kernel(logvars)
        torch.save((theta, kl, state, *grads, variance), sys.argv[2])
        """
    )
    out = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"fastbnf_generic_{os.getpid()}.pt")
    env = dict(os.environ, FASTBNF_CPU_ISA="generic")
    subprocess.run(
        [sys.executable, "-c", script, os.path.dirname(__file__), out], check=True, env=env
    )
    try:
        other = torch.load(out)
    finally:
        os.remove(out)
    assert torch.equal(state, other[2])
    # Bitwise equal when built with -ffp-contract=off (the build's flags); a few ulp otherwise.
    tol = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(theta, other[0], **tol)
    torch.testing.assert_close(grads[0], other[3], **tol)
    torch.testing.assert_close(grads[1], other[4], **tol)
    torch.testing.assert_close(K.variance_kernel(logvars), other[5], **tol)
    torch.testing.assert_close(kl, other[1], rtol=1e-6, atol=0)


# --------------------------------------------------------------------------------------------
# Statistics of the noise.


def ks_distance(x):
    x = torch.sort(x.double()).values
    n = x.numel()
    cdf = torch.special.ndtr(x)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return torch.maximum(i / n - cdf, cdf - (i - 1) / n).max().item()


def corr(a, b):
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return (a * b).sum().item() / math.sqrt((a * a).sum().item() * (b * b).sum().item())


def test_noise_statistics():
    size = 100_003
    means, logvars = standard_group([(size,), (size,)])
    torch.manual_seed(0)  # the bounds below fail by chance with probability about 1e-3 each
    theta, _, _ = K.sample_kernel(means, logvars, None, None, False, 1.0, None, None, 0)
    theta2, _, _ = K.sample_kernel(means, logvars, None, None, False, 1.0, None, None, 0)
    many, _, _ = K.sample_kernel(means, logvars, 4, None, False, 1.0, None, None, 0)
    bound = 5 / math.sqrt(size)  # 5 sigma for correlations and the mean

    eps = theta[:size]
    assert abs(theta.mean().item()) < bound
    assert abs(theta.var().item() - 1) < 5 * math.sqrt(2 / theta.numel())
    # The KS statistic exceeds 1.95 / sqrt(n) with probability 0.1%.
    assert ks_distance(theta) < 1.95 / math.sqrt(theta.numel())
    # Fourth moment (a wrong transform or lane mix-up shows here).
    assert abs((theta.double() ** 4).mean().item() - 3) < 0.1
    assert abs(corr(theta[:size], theta[size:])) < bound  # across tensors
    assert abs(corr(theta, theta2)) < bound  # across calls
    for lag in (1, 2, 3, 4, 5, 8):  # inside a tensor: lanes, Box-Muller pairs, blocks
        assert abs(corr(eps[:-lag], eps[lag:])) < bound, lag
        assert abs(corr(eps[:-lag] ** 2, eps[lag:] ** 2)) < 2 * bound, lag
    for s in range(1, 4):  # across the samples of n
        assert abs(corr(many[0], many[s])) < bound
    for s in range(4):
        assert ks_distance(many[s]) < 1.95 / math.sqrt(many.shape[1])


def test_stream_separates_ranks():
    means, logvars = standard_group([(50_000,)])
    torch.manual_seed(0)
    a, _, _ = K.sample_kernel(means, logvars, None, None, False, 1.0, None, None, 0)
    torch.manual_seed(0)
    b, _, _ = K.sample_kernel(means, logvars, None, None, False, 1.0, None, None, 1)
    assert abs(corr(a, b)) < 5 / math.sqrt(a.numel())


# --------------------------------------------------------------------------------------------
# Edge cases.


@pytest.mark.parametrize("n", [None, 0, 2])
def test_empty_and_scalar_tensors(n):
    means, logvars = make_group(shapes=[(0,), (), (0, 3), ()])
    theta, kl, state = K.sample_kernel(means, logvars, n, None, True, 1.0, None, None, 0)
    assert theta.shape == ((2,) if n is None else (n, 2))
    torch.testing.assert_close(kl, reference.kl(means, logvars))
    g = torch.ones(theta.shape)
    gm, gl = K.sample_backward_kernel(g, torch.tensor(1.0), means, logvars, state, True, 1.0, None, None)
    assert gm.shape == gl.shape == (2,)
    assert torch.isfinite(gm).all() and torch.isfinite(gl).all()


def test_all_empty_group():
    means, logvars = make_group(shapes=[(0,), (0, 5)])
    theta, kl, state = K.sample_kernel(means, logvars, None, None, True, 1.0, None, None, 0)
    assert theta.shape == (0,) and kl.item() == 0.0
    gm, gl = K.sample_backward_kernel(theta, torch.tensor(1.0), means, logvars, state, True, 1.0, None, None)
    assert gm.shape == gl.shape == (0,)
    assert K.variance_kernel(logvars).shape == (0,)
    assert K.kl_kernel(means, logvars, 1.0, None, None).item() == 0.0


def test_extreme_logvars():
    r"""softclip keeps sigma finite for any logvar; theta and the KL stay finite."""

    lv = torch.tensor([-1e30, -1e4, -100.0, -18.0, 0.0, 18.0, 100.0, 1e4, 1e30])
    means, logvars = [torch.zeros_like(lv)], [lv]
    theta, kl, state = K.sample_kernel(means, logvars, None, None, True, 1.0, None, None, 0)
    assert torch.isfinite(theta).all() and torch.isfinite(kl)
    torch.testing.assert_close(K.variance_kernel(logvars), reference.variance(logvars))
    torch.testing.assert_close(kl, reference.kl(means, logvars))


def test_subnormals_survive_loading():
    r"""The extension is compiled without -ffast-math at link time: no flush-to-zero."""

    assert torch.tensor(1e-40).item() != 0.0
    assert (torch.tensor(1e-39) * 0.5).item() != 0.0
    script = (
        "import torch; from fastbnf._backend import has_kernel; assert has_kernel('cpu'); "
        "assert torch.tensor(1e-40).item() != 0.0"
    )
    subprocess.run([sys.executable, "-c", script], check=True)


# --------------------------------------------------------------------------------------------
# Errors.


def test_bad_inputs():
    means, logvars = make_group()
    args = (None, None, True, 1.0, None, None, 0)
    with pytest.raises(RuntimeError, match="fastbnf::sample_kernel: means and logvars"):
        K.sample_kernel(means, logvars[:-1], *args)
    with pytest.raises(RuntimeError, match=r"fastbnf::sample_kernel: logvars\[0\] is not contiguous"):
        K.sample_kernel(means, [logvars[0].t().contiguous().t(), *logvars[1:]], *args)
    with pytest.raises(RuntimeError, match=r"fastbnf::sample_kernel: logvars\[3\] has dtype"):
        K.sample_kernel(means, [*logvars[:3], logvars[3].double(), *logvars[4:]], *args)
    with pytest.raises(RuntimeError, match=r"logvars\[0\] has shape \[7, 3\], expected \[21\] like means\[0\]"):
        K.sample_kernel([means[0].reshape(-1), *means[1:]], logvars, *args)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        K.sample_kernel([m.half() for m in means], [v.half() for v in logvars], *args)
    with pytest.raises(RuntimeError, match="prior_vars has"):
        K.sample_kernel(means, logvars, None, None, True, 1.0, [1.0], None, 0)
    with pytest.raises(RuntimeError, match=r"prior_vars\[1\] must be positive"):
        K.sample_kernel(means, logvars, None, None, True, 1.0, [1.0, -1.0] + [1.0] * 4, None, 0)
    with pytest.raises(RuntimeError, match="prior_var must be positive"):
        K.kl_kernel(means, logvars, 0.0, None, None)
    with pytest.raises(RuntimeError, match=r"prior_means\[0\] has shape \[3\]"):
        K.kl_kernel(means, logvars, 1.0, None, [torch.zeros(3)] * len(means))
    with pytest.raises(RuntimeError, match="out_dtype"):
        K.sample_kernel(means, logvars, None, torch.int32, True, 1.0, None, None, 0)
    with pytest.raises(RuntimeError, match="n must be non-negative"):
        K.sample_kernel(means, logvars, -1, None, True, 1.0, None, None, 0)

    theta, _, state = K.sample_kernel(means, logvars, *args)
    bargs = (means, logvars)
    with pytest.raises(RuntimeError, match=r"fastbnf::sample_backward_kernel: rng_state must have shape"):
        K.sample_backward_kernel(theta, torch.tensor(1.0), *bargs, state[:1], True, 1.0, None, None)
    with pytest.raises(RuntimeError, match="rng_state has dtype"):
        K.sample_backward_kernel(theta, torch.tensor(1.0), *bargs, state.int(), True, 1.0, None, None)
    with pytest.raises(RuntimeError, match="grad_theta has shape"):
        K.sample_backward_kernel(theta[1:], torch.tensor(1.0), *bargs, state, True, 1.0, None, None)


# --------------------------------------------------------------------------------------------
# opcheck.


def _fake_flat(tensors, shape, dtype=None):
    return tensors[0].new_empty(shape, dtype=dtype)


def _numel(tensors):
    return sum(t.numel() for t in tensors)


def _ensure_fakes():
    r"""Registers shape-only fake kernels for the kernel ops where fastbnf does not (the public
    ops are what torch.compile traces; opcheck's fake-tensor test needs the kernel ops' too)."""

    def fake_sample(means, logvars, n, out_dtype, with_kl, prior_var, prior_vars, prior_means, stream):
        shape = (_numel(means),) if n is None else (n, _numel(means))
        return (
            _fake_flat(means, shape, out_dtype),
            _fake_flat(means, ()),
            _fake_flat(means, (2,), torch.int64),
        )

    def fake_grads(*args):
        means = args[-5]
        return _fake_flat(means, (_numel(means),)), _fake_flat(means, (_numel(means),))

    fakes = {
        "sample_kernel": fake_sample,
        "sample_backward_kernel": lambda g, gk, m, lv, s, w, pv, pvs, pms: fake_grads(m, lv, pv, pvs, pms),
        "kl_kernel": lambda m, lv, pv, pvs, pms: _fake_flat(m, ()),
        "kl_backward_kernel": lambda gk, m, lv, pv, pvs, pms: fake_grads(m, lv, pv, pvs, pms),
        "variance_kernel": lambda lv: _fake_flat(lv, (_numel(lv),)),
    }
    for name, fn in fakes.items():
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"fastbnf::{name}", "Meta"):
            torch.library.register_fake(f"fastbnf::{name}")(fn)


# sample_kernel draws fresh noise on every call, so opcheck's comparisons of repeated calls
# (test_aot_dispatch_dynamic) cannot hold; its schema, autograd registration and fake kernel
# are checked.
RANDOM_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype):
    _ensure_fakes()
    means, logvars = make_group(dtype)
    prior_means = [torch.randn_like(m) for m in means]
    prior = (0.5, [1.0 + i for i in range(len(means))], prior_means)
    theta, _, state = K.sample_kernel(means, logvars, 2, None, True, *prior, 0)
    grad = torch.randn_like(theta)
    grad_kl = torch.tensor(0.25, dtype=dtype)

    torch.library.opcheck(
        K.sample_kernel.default, (means, logvars, 2, None, True, *prior, 0), test_utils=RANDOM_UTILS
    )
    torch.library.opcheck(
        K.sample_kernel.default, (means, logvars, None, torch.bfloat16, False, 1.0, None, None, 3),
        test_utils=RANDOM_UTILS,
    )
    torch.library.opcheck(
        K.sample_backward_kernel.default, (grad, grad_kl, means, logvars, state, True, *prior)
    )
    torch.library.opcheck(K.kl_kernel.default, (means, logvars, *prior))
    torch.library.opcheck(K.kl_backward_kernel.default, (grad_kl, means, logvars, *prior))
    torch.library.opcheck(K.variance_kernel.default, (logvars,))


# --------------------------------------------------------------------------------------------
# The pool of large outputs (csrc/cpu/buffer_pool.h)


def pool_group(numel=1_000_000):
    return [torch.randn(numel)], [torch.full((numel,), -3.0)]


def test_large_outputs_are_recycled():
    fastbnf.empty_cache()
    means, logvars = pool_group()
    theta, _, _ = K.sample_kernel(means, logvars, None, None, False, 1.0, None, None, 0)
    address = theta.data_ptr()
    assert address % (2 << 20) == 0  # huge-page aligned
    del theta
    assert fastbnf.cached_bytes() == 4 * 1_000_000

    theta, _, rng_state = K.sample_kernel(means, logvars, None, None, False, 1.0, None, None, 0)
    assert theta.data_ptr() == address and fastbnf.cached_bytes() == 0
    # A recycled buffer holds no stale values: every element is written.
    eps = (theta - means[0]) / reference.softclip(logvars[0]).div(2).exp()
    torch.testing.assert_close(
        eps[:1000].double(), torch.from_numpy(numpy_normals(*rng_state.tolist(), np.arange(1000))),
        rtol=1e-5, atol=1e-5,
    )
    with pytest.raises(RuntimeError, match="not resizable"):
        theta.resize_(2_000_000)

    del theta
    assert fastbnf.empty_cache() == 4 * 1_000_000
    assert fastbnf.cached_bytes() == 0


def test_mid_size_outputs_are_recycled_page_aligned():
    # Above glibc's mmap threshold (128 KiB), below a huge page: pooled, page aligned.
    fastbnf.empty_cache()
    means, logvars = pool_group(100_000)
    args = (torch.ones(100_000), torch.ones(()), means, logvars, torch.tensor([1, 0]), False, 1.0)

    grads = K.sample_backward_kernel(*args, None, None)
    addresses = {g.data_ptr() for g in grads}
    assert all(a % 4096 == 0 for a in addresses) and len(addresses) == 2
    del grads
    assert fastbnf.cached_bytes() == 2 * 400_000

    grads = K.sample_backward_kernel(*args, None, None)
    assert {g.data_ptr() for g in grads} == addresses and fastbnf.cached_bytes() == 0
    torch.testing.assert_close(grads[0], torch.ones(100_000))
    del grads
    fastbnf.empty_cache()


def test_small_outputs_are_not_pooled():
    fastbnf.empty_cache()
    means, logvars = pool_group(30_000)  # 120 kB
    theta, _, _ = K.sample_kernel(means, logvars, None, None, False, 1.0, None, None, 0)
    del theta
    assert fastbnf.cached_bytes() == 0


def pooled_bytes_after_six_outputs(**env):
    r"""In a fresh process: the idle bytes after six 4 MB outputs die together."""

    code = textwrap.dedent(
        """
        import torch, fastbnf
        from fastbnf._backend import has_kernel
        assert has_kernel("cpu")
        means, logvars = [torch.randn(1_000_000)], [torch.zeros(1_000_000)]
        outs = [torch.ops.fastbnf.sample_kernel(means, logvars, None, None, False, 1.0, None,
                                                None, 0)[0] for _ in range(6)]
        del outs
        print(fastbnf.cached_bytes())
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=dict(os.environ, **env), capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip())


def test_pool_keeps_at_most_four_times_the_largest():
    assert pooled_bytes_after_six_outputs() == 4 * 4_000_000


def test_pool_can_be_turned_off():
    assert pooled_bytes_after_six_outputs(FASTBNF_CPU_CACHE="0") == 0


# --------------------------------------------------------------------------------------------
# The eager path's helpers (csrc/eager_helpers.cpp)


def test_views_like_matches_unflatten():
    like = [torch.empty(s) for s in [(7, 3), (), (0, 4), (129,), (2, 3, 5)]]
    flat = torch.randn(1 + sum(t.numel() for t in like))[1:]  # a storage offset
    got = K.views_like(flat, like)
    expected = torch._C._nn.unflatten_dense_tensors(flat, like)
    assert [g.shape for g in got] == [e.shape for e in expected]
    for g, e in zip(got, expected):
        assert torch.equal(g, e) and g.is_contiguous()
        assert g.numel() == 0 or g.data_ptr() == e.data_ptr()  # aliases, not copies
    got[3][0] = 42.0
    assert flat[22] == 42.0


def test_views_like_rejects_a_size_mismatch():
    like = [torch.empty(3), torch.empty(4)]
    with pytest.raises(RuntimeError, match="the tensors hold 7 elements but flat has 6"):
        K.views_like(torch.zeros(6), like)
    with pytest.raises(RuntimeError, match="contiguous 1-dim"):
        K.views_like(torch.zeros(7, 1), like)


@pytest.mark.parametrize("layout", ["in order", "reversed", "gap", "two storages", "transposed"])
def test_adjacent_flat_matches_the_python_twin(monkeypatch, layout):
    from fastbnf import ops

    buffer = torch.randn(100)
    if layout == "in order":
        tensors = [buffer[:30], buffer[30:60].view(5, 6), buffer[60:100]]
    elif layout == "reversed":
        tensors = [buffer[60:100], buffer[30:60], buffer[:30]]
    elif layout == "gap":
        tensors = [buffer[:30], buffer[31:60]]
    elif layout == "two storages":
        tensors = [buffer[:30], torch.randn(30)]
    else:
        tensors = [buffer[:30], buffer[30:60].view(5, 6).T]
    compiled = K.adjacent_flat(tensors)
    monkeypatch.setattr(ops, "extension_loaded", lambda: False)
    twin = ops._adjacent(tensors)
    if layout == "in order":
        assert torch.equal(compiled, buffer) and torch.equal(twin, buffer)
        assert compiled.data_ptr() == twin.data_ptr() == buffer.data_ptr()
    else:
        assert compiled is None and twin is None
