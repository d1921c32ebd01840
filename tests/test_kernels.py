r"""Tests of the compiled kernel ops ``fastbnf::<name>_kernel`` on every device they are built for.

Each test runs on the CPU kernels (never skipped in CI, which builds them) and on the CUDA
kernels (skipped without a GPU). They check:

* the maths against the pure-PyTorch twins of :mod:`fastbnf.reference` given the same noise:
  bit for bit in float64 on the CPU, within 1 ulp in float32 (2 ulp on CUDA, whose exp and
  rsqrt are not the CPU's);
* the noise against a NumPy Philox written independently (``philox_twin.py``), its key, its
  statistics and its independence from PyTorch's own random streams;
* every pair of group and sample dtypes the kernels are built for, against float64 formulas;
* groups of many odd-sized tensors spanning many chunks and tiles, low-precision samples and
  gradients, edge cases, and ``torch.library.opcheck``.

Behaviour of one device only lives in ``test_cpu_kernel.py`` and ``test_cuda.py``.
"""

import math

import numpy as np
import pytest
import torch
from closed_form import Formulas, expected_eps, f64
from philox_twin import (
    KEY_DOMAIN,
    SALT_MIX,
    curand_counters,
    fastbnf_counters,
    numpy_normals,
    philox4x32_10,
    philox_key,
    philox_words,
)

import fastbnf  # noqa: F401 (declares the ops)
from fastbnf import reference
from fastbnf._backend import has_kernel

K = torch.ops.fastbnf

DEVICES = [
    pytest.param(
        "cpu", marks=pytest.mark.skipif(not has_kernel("cpu"), reason="CPU kernel not built")
    ),
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(
                not (torch.cuda.is_available() and has_kernel("cuda")),
                reason="CUDA kernel not built or no GPU",
            ),
        ],
    ),
]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


# Sizes that are not multiples of 4, a 0-dim tensor and an empty one.
SHAPES = [(7, 3), (), (0, 4), (129,), (2, 3, 5), (1,), (64, 33)]

# Sizes that cut the CPU's 4096-element chunks and the CUDA tiles at odd places.
MANY = [((37 * t) % 997 + 1,) for t in range(300)] + [(70001,), (333, 257), (5000,)]


def make_group(device, dtype=torch.float32, shapes=SHAPES, seed=0, lv_range=(-6.0, 2.0)):
    generator = torch.Generator().manual_seed(seed)
    means = [torch.randn(s, generator=generator, dtype=torch.float64) for s in shapes]
    lo, hi = lv_range
    logvars = [
        torch.rand(s, generator=generator, dtype=torch.float64) * (hi - lo) + lo for s in shapes
    ]
    return [m.to(device, dtype) for m in means], [v.to(device, dtype) for v in logvars]


def zeros_like_group(means):
    return [torch.zeros(m.shape, device=m.device) for m in means]


def numel(tensors):
    return sum(t.numel() for t in tensors)


# --------------------------------------------------------------------------------------------
# Units in the last place.


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> int:
    r"""The largest distance in representable values between two tensors of one float dtype."""

    assert a.dtype == b.dtype and a.shape == b.shape
    if a.numel() == 0:
        return 0
    bits = {
        torch.float64: torch.int64,
        torch.float32: torch.int32,
        torch.float16: torch.int16,
        torch.bfloat16: torch.int16,
    }[a.dtype]
    top = {torch.int64: 2**63 - 1, torch.int32: 2**31 - 1, torch.int16: 2**15 - 1}[bits]

    def ordered(x):
        i = x.detach().cpu().contiguous().view(bits).to(torch.int64)
        return torch.where(i < 0, -(i & top), i)  # -0 and +0 alike, monotone in the value

    assert not (a.isnan() ^ b.isnan()).any()
    keep = ~a.isnan()
    return (
        int((ordered(a)[keep.cpu()] - ordered(b)[keep.cpu()]).abs().max().item())
        if keep.any()
        else 0
    )


def test_ulp_distance():
    one = torch.tensor([1.0, -2.0, 0.0])
    assert ulp_distance(one, one) == 0
    assert ulp_distance(one, torch.nextafter(one, torch.full_like(one, 10.0))) == 1
    assert ulp_distance(torch.tensor([0.0]), torch.tensor([-0.0])) == 0
    tiny = torch.tensor([torch.finfo(torch.float32).tiny])
    assert ulp_distance(tiny, -tiny) == 2 * 2**23


def tolerance_ulp(device, dtype, composite=False) -> int:
    r"""How far a kernel may be from the twin given the same noise, in ulps of an output that is
    one exp of softclip (the variance), or of the largest term of a composite output (theta, the
    gradients), where the roundings of the operations after the exp add up to 2 ulps more.

    On the CPU every operation is PyTorch's, its float64 exp included (the kernels call MKL's,
    as torch.exp does): float64 is bit for bit. The float32 exp is a vectorized polynomial
    within 1 ulp of PyTorch's. CUDA's expf and rsqrtf are PyTorch's CUDA ones: 2 ulp."""

    if device == "cpu" and dtype == torch.float64:
        return 0
    single = 1 if device == "cpu" else 2
    return single + 2 if composite else single


def assert_close_in_ulps(got, ref, scale, ulps):
    r"""``|got - ref| <= ulps`` units in the last place of ``scale`` (in the outputs' dtype).

    ``scale`` is the magnitude of the largest term that makes an output (``|mu| + |sigma eps|``
    for theta, say): one ulp of exp in sigma is one ulp of ``sigma eps``, which is many ulps of
    theta where mu cancels it. With ``ulps = 0`` the two must be equal bit for bit."""

    assert got.dtype == ref.dtype and got.shape == ref.shape
    if ulps == 0:
        assert ulp_distance(got, ref) == 0
        return
    diff = (got.double() - ref.double()).abs().cpu()
    finfo = torch.finfo(got.dtype)
    # The spacing of the dtype at |scale|: 2^(exponent - mantissa bits), subnormals included.
    exponent = torch.floor(torch.log2(scale.double().cpu().clamp_min(finfo.tiny)))
    spacing = torch.exp2(exponent) * finfo.eps
    excess = diff - ulps * spacing
    assert excess.max().item() <= 0, (diff / spacing).max().item()


# --------------------------------------------------------------------------------------------
# The noise: the kernels' stream, and the twin's maths given that noise.


def kernel_eps(device, shapes, n, seed):
    r"""The kernels' noise of a group (mu = 0, logvar = 0: theta is eps, in float32), and the
    rng_state it was drawn from; the same seed draws the same key for any group of that numel."""

    zeros = [torch.zeros(s, device=device) for s in shapes]
    torch.manual_seed(seed)
    eps, _, rng_state = K.sample_kernel(zeros, zeros, n, None, False, 1.0, None, None, 0)
    return eps, rng_state


class InjectedNoise:
    r"""Hands the reference the kernels' noise of the flat indices it asks for (the runs of the
    stream that ``reference._noise`` is given, forward and backward alike)."""

    def __init__(self, eps: torch.Tensor):
        self.eps = eps

    def __call__(self, stream, ranges, shape, dtype, device):
        pieces = [self.eps[..., start : start + count] for start, count in ranges]
        piece = torch.cat(pieces, dim=-1) if pieces else self.eps[..., :0]
        assert tuple(piece.shape) == tuple(shape)
        return piece.to(device=device, dtype=dtype, copy=True)


def run_reference(monkeypatch, eps, fn, *args):
    monkeypatch.setattr(reference, "_noise", InjectedNoise(eps))
    return fn(*args)


PRIORS = ["default", "scalar", "per_tensor"]


def prior_options(case, means):
    if case == "default":
        return 1.0, None, None
    if case == "scalar":
        return 0.37, None, None
    generator = torch.Generator().manual_seed(1)
    prior_vars = [0.5 + 0.25 * t for t in range(len(means))]
    prior_means = [
        torch.randn(m.shape, generator=generator, dtype=torch.float64).to(m) for m in means
    ]
    return 1.0, prior_vars, prior_means


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [None, 1, 3])
@pytest.mark.parametrize("prior", PRIORS)
def test_sample_equals_the_twin(monkeypatch, device, dtype, n, prior):
    r"""theta and the KL of the kernel against the reference given the same eps."""

    means, logvars = make_group(device, dtype)
    args = prior_options(prior, means)
    eps, _ = kernel_eps(device, [m.shape for m in means], n, seed=3)
    torch.manual_seed(3)
    theta, kl, rng_state = K.sample_kernel(means, logvars, n, None, True, *args, 0)
    ref_theta, ref_kl, _ = run_reference(
        monkeypatch, eps, reference.sample, means, logvars, n, None, True, *args, 0
    )
    assert theta.shape == ref_theta.shape and theta.dtype == dtype
    assert kl.shape == () and kl.dtype == dtype
    assert rng_state.dtype == torch.int64 and rng_state.shape == (2,)
    mu = f64(means)
    scale = mu.abs() + (ref_theta.double().cpu() - mu).abs()
    assert_close_in_ulps(theta, ref_theta, scale, tolerance_ulp(device, dtype, composite=True))
    rtol = {torch.float64: 1e-13, torch.float32: 2e-6}.get(dtype, 1e-2)
    torch.testing.assert_close(kl.double(), ref_kl.double(), rtol=rtol, atol=0)


def backward_equals_the_twin(
    monkeypatch, means, logvars, args, g, grad_kl, eps, rng_state, with_kl
):
    r"""The kernel's sample_backward against the twin's given the kernel's noise ``eps``."""

    device, dtype = means[0].device.type, means[0].dtype
    out = K.sample_backward_kernel(g, grad_kl, means, logvars, rng_state, with_kl, *args)
    expected = run_reference(
        monkeypatch, eps, reference.sample_backward, g, grad_kl, means, logvars, rng_state,
        with_kl, *args,
    )  # fmt: skip
    scales = Formulas(means, logvars, *args).scales(g, eps, grad_kl if with_kl else None)
    for got, ref, scale in zip(out, expected, scales):
        assert got.dtype == dtype and got.shape == (numel(means),)
        assert_close_in_ulps(got, ref, scale, tolerance_ulp(device, dtype, composite=True))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [None, 1, 3])
@pytest.mark.parametrize("with_kl", [True, False])
@pytest.mark.parametrize("prior", PRIORS)
def test_sample_backward_equals_the_twin(monkeypatch, device, dtype, n, with_kl, prior):
    means, logvars = make_group(device, dtype)
    args = prior_options(prior, means)
    eps, rng_state = kernel_eps(device, [m.shape for m in means], n, seed=5)
    generator = torch.Generator().manual_seed(2)
    g = torch.randn(eps.shape, generator=generator).to(device, dtype)
    grad_kl = torch.tensor(0.7, device=device, dtype=dtype)
    backward_equals_the_twin(
        monkeypatch, means, logvars, args, g, grad_kl, eps, rng_state, with_kl
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("prior", PRIORS)
def test_kl_and_its_backward_equal_the_twin(device, dtype, prior):
    means, logvars = make_group(device, dtype, lv_range=(-30.0, 30.0))
    args = prior_options(prior, means)
    kl = K.kl_kernel(means, logvars, *args)
    rtol = {torch.float64: 1e-13, torch.float32: 2e-6}.get(dtype, 1e-2)
    torch.testing.assert_close(
        kl.double(), reference.kl(means, logvars, *args).double(), rtol=rtol, atol=0
    )
    grad_kl = torch.tensor(1.3, device=device, dtype=dtype)
    out = K.kl_backward_kernel(grad_kl, means, logvars, *args)
    expected = reference.kl_backward(grad_kl, means, logvars, *args)
    scales = Formulas(means, logvars, *args).scales(gk=grad_kl)
    for got, ref, scale in zip(out, expected, scales):
        assert got.dtype == dtype
        assert_close_in_ulps(got, ref, scale, tolerance_ulp(device, dtype, composite=True))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_variance_equals_the_twin(device, dtype):
    _, logvars = make_group(device, dtype, lv_range=(-60.0, 60.0))
    out = K.variance_kernel(logvars)
    assert out.dtype == dtype
    assert ulp_distance(out, reference.variance(logvars)) <= tolerance_ulp(device, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_many_odd_tensors_against_the_twin(monkeypatch, device, dtype):
    r"""303 tensors of odd sizes over about 60 chunks of the CPU and hundreds of CUDA tiles, with
    3 samples (rows start mid Philox block): every element against the twin, eps against
    NumPy."""

    means, logvars = make_group(device, dtype, shapes=MANY, seed=4)
    args = prior_options("per_tensor", means)
    eps, rng_state = kernel_eps(device, MANY, 3, seed=9)
    twin_eps = numpy_normals(*rng_state.tolist(), np.arange(eps.numel())).reshape(eps.shape)
    torch.testing.assert_close(
        eps.double().cpu(), torch.from_numpy(twin_eps), rtol=1e-6, atol=2e-7
    )

    torch.manual_seed(9)
    theta, kl, _ = K.sample_kernel(means, logvars, 3, None, True, *args, 0)
    ref_theta, ref_kl, _ = run_reference(
        monkeypatch, eps, reference.sample, means, logvars, 3, None, True, *args, 0
    )
    mu = f64(means)
    scale = mu.abs() + (ref_theta.double().cpu() - mu).abs()
    assert_close_in_ulps(theta, ref_theta, scale, tolerance_ulp(device, dtype, composite=True))
    torch.testing.assert_close(
        kl.double(), ref_kl.double(), rtol=1e-12 if dtype == torch.float64 else 2e-6, atol=0
    )

    g = torch.linspace(-1, 1, theta.numel(), dtype=dtype, device=device).reshape(theta.shape)
    grad_kl = torch.tensor(0.3, dtype=dtype, device=device)
    backward_equals_the_twin(monkeypatch, means, logvars, args, g, grad_kl, eps, rng_state, True)


# --------------------------------------------------------------------------------------------
# Every pair of group and output (theta, grad_theta) dtypes, against the float64 formulas

COMBOS = [
    (torch.float32, torch.float32),
    (torch.float32, torch.float16),
    (torch.float32, torch.bfloat16),
    (torch.float64, torch.float64),
    (torch.float64, torch.float16),
    (torch.float64, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.float16, torch.bfloat16),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float16),
]


def _rel(dtype):
    r"""A relative tolerance of one rounding to dtype plus the float32 arithmetic."""

    return {torch.float64: 1e-6, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[
        dtype
    ]


@pytest.mark.parametrize("dtype,out_dtype", COMBOS, ids=lambda d: str(d).split(".")[-1])
def test_dtype_pairs(device, dtype, out_dtype):
    r"""Forward and backward of every kernel instantiation against the float64 formulas:
    float16 and bfloat16 groups compute in float32 and round once on store."""

    means, logvars = make_group(device, dtype, lv_range=(-4.0, 0.0))
    f = Formulas(means, logvars, 0.5)
    out = None if out_dtype == dtype else out_dtype
    theta, kl, rng_state = K.sample_kernel(means, logvars, 2, out, True, 0.5, None, None, 0)
    assert theta.dtype == out_dtype and kl.dtype == dtype
    numel = theta.shape[1]
    eps = expected_eps(rng_state, 2, numel)
    tol = max(_rel(dtype), _rel(out_dtype))
    torch.testing.assert_close(theta.double().cpu(), f.theta(eps), rtol=tol, atol=4 * tol)
    torch.testing.assert_close(kl.double().cpu(), f.kl(), rtol=_rel(dtype), atol=1e-3)

    grad = torch.randn(theta.shape, device=device).to(out_dtype)
    gk = torch.tensor(0.7, dtype=dtype, device=device)
    grad_mu, grad_lv = K.sample_backward_kernel(
        grad, gk, means, logvars, rng_state, True, 0.5, None, None
    )
    assert grad_mu.dtype == dtype and grad_lv.dtype == dtype
    exp_mu, exp_lv = f.grads(grad.double().cpu(), eps, gk.double().item())
    torch.testing.assert_close(grad_mu.double().cpu(), exp_mu, rtol=tol, atol=4 * tol)
    torch.testing.assert_close(grad_lv.double().cpu(), exp_lv, rtol=tol, atol=4 * tol)

    var = K.variance_kernel(logvars)
    assert var.dtype == dtype
    torch.testing.assert_close(var.double().cpu(), f.lc.exp(), rtol=_rel(dtype), atol=0)


# --------------------------------------------------------------------------------------------
# The stream against the NumPy twin.


@pytest.mark.parametrize(
    "counter, key, expected",
    [
        ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
        ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
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


def eps_ulp_from_twin(eps: torch.Tensor, seed: int, offset: int) -> int:
    r"""The ulp distance between the kernels' float32 eps and the twin's float64 one rounded."""

    expected = numpy_normals(seed, offset, np.arange(eps.numel())).astype(np.float32)
    return ulp_distance(eps.reshape(-1).cpu(), torch.from_numpy(expected))


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**63 + 977, 2**64 - 1])
@pytest.mark.parametrize("n", [None, 3])
def test_stream_equals_the_twin(device, seed, n):
    r"""With mu = 0 and logvar = 0, theta is eps: the twin's normals to a few ulp of the
    float32 log, sqrt and sinpi (the angle in half-turns keeps the error relative)."""

    # An odd total so that the samples of n > 1 start mid-block.
    eps, rng_state = kernel_eps(device, [(1000,), (0,), (), (37, 3), (2001,)], n, seed % 2**63)
    salted_seed, offset = rng_state.tolist()
    assert eps_ulp_from_twin(eps, salted_seed, offset) <= 4


def test_backward_follows_rng_state(device):
    r"""Backward regenerates the noise from rng_state alone: a forged state gives the twin's
    stream of that state (offsets and high seed words included)."""

    shapes = [(513,), (5, 7)]
    zeros = [torch.zeros(s, device=device) for s in shapes]
    N = numel(zeros)
    for seed, offset in [(7, 0), (-3, 5), (2**40 + 3, 2**33 + 1)]:
        state = torch.tensor([seed, offset], dtype=torch.int64, device=device)
        # With mu = logvar = 0, grad_logvar = 0.5 * g * eps: g = 2 gives eps.
        g = torch.full((N,), 2.0, device=device)
        _, grad_logvar = K.sample_backward_kernel(
            g, torch.zeros((), device=device), zeros, zeros, state, False, 1.0, None, None
        )
        assert eps_ulp_from_twin(grad_logvar, seed, offset) <= 4


def test_seed_comes_from_the_default_generator(device):
    means, logvars = make_group(device)
    args = (None, None, True, 1.0, None, None)
    torch.manual_seed(3)
    a = K.sample_kernel(means, logvars, *args, 0)
    b = K.sample_kernel(means, logvars, *args, 0)
    torch.manual_seed(3)
    c = K.sample_kernel(means, logvars, *args, 0)
    assert torch.equal(a[0], c[0]) and torch.equal(a[2], c[2])
    assert not torch.equal(a[0], b[0])
    devices = [torch.cuda.current_device()] if device == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        d = K.sample_kernel(means, logvars, *args, 0)
    e = K.sample_kernel(means, logvars, *args, 0)
    assert torch.equal(d[0], e[0])
    # The stream number is folded into the seed.
    torch.manual_seed(3)
    f = K.sample_kernel(means, logvars, *args, 5)
    seed_a, seed_f = (int(x[2][0]) & (2**64 - 1) for x in (a, f))
    assert seed_a ^ seed_f == (5 * SALT_MIX) & (2**64 - 1)
    assert int(a[2][1]) == int(f[2][1])
    assert not torch.equal(a[0], f[0])


def test_key_is_separated_from_pytorchs_streams():
    r"""PyTorch's CUDA random ops draw block (offset / 4) of subsequence `thread` under the
    generator's seed itself; fastbnf puts the block in words 0-1 and the offset in 2-3, so
    under the same key the two layouts would meet (block b at offset o is curand's thread o at
    offset 4 b). fastbnf's key is the seed mixed with its domain constant: no meeting."""

    seed = 42  # on CUDA rank 0's stream seed is the generator's seed
    blocks, offsets = np.arange(64), range(0, 64, 4)
    threads, curand_offsets = np.arange(64), range(0, 256, 4)

    def outputs(key, counters):
        return {tuple(w) for w in philox_words(key, counters).tolist()}

    fastbnf_key = philox_key(seed)
    assert fastbnf_key != seed
    theirs = set()
    for o in curand_offsets:
        theirs |= outputs(seed, curand_counters(threads, o))
    ours = set()
    for o in offsets:
        ours |= outputs(fastbnf_key, fastbnf_counters(blocks, o))
    assert len(ours) == len(blocks) * len(offsets) and not ours & theirs

    # The check can fail: keyed by the seed itself, fastbnf's layout would repeat curand's.
    unmixed = set()
    for o in offsets:
        unmixed |= outputs(seed, fastbnf_counters(blocks, o))
    assert len(unmixed & theirs) > 100

    # The key is a bijection of the stream seed (distinct seeds, distinct keys).
    keys = {philox_key(s) for s in range(10_000)}
    assert len(keys) == 10_000 and philox_key(0) != KEY_DOMAIN


# --------------------------------------------------------------------------------------------
# Statistics of the noise: a counter-reuse bug shows only here. Seeded: each bound fails by
# chance with probability about 1e-3 at most, and a fixed seed makes the outcome fixed.


def ks_distance(x):
    x = torch.sort(x.double().cpu()).values
    n = x.numel()
    cdf = torch.special.ndtr(x)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return torch.maximum(i / n - cdf, cdf - (i - 1) / n).max().item()


def corr(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    a, b = a - a.mean(), b - b.mean()
    return (a * b).sum().item() / math.sqrt((a * a).sum().item() * (b * b).sum().item())


def test_noise_statistics(device):
    size = 100_003
    shapes = [(size,), (size,)]
    eps, _ = kernel_eps(device, shapes, None, seed=0)
    again, _ = kernel_eps(device, shapes, None, seed=1)
    many, _ = kernel_eps(device, shapes, 4, seed=2)
    bound = 5 / math.sqrt(size)  # 5 sigma for correlations and the mean

    first = eps[:size]
    assert abs(eps.double().mean().item()) < bound
    assert abs(eps.double().var().item() - 1) < 5 * math.sqrt(2 / eps.numel())
    assert ks_distance(eps) < 1.95 / math.sqrt(eps.numel())  # p = 0.001
    assert abs((eps.double() ** 4).mean().item() - 3) < 0.1  # a wrong transform shows here
    assert abs(corr(eps[:size], eps[size:])) < bound  # across tensors
    assert abs(corr(eps, again)) < bound  # across calls
    for lag in (1, 2, 3, 4, 5, 8):  # inside a tensor: lanes, Box-Muller pairs, blocks
        assert abs(corr(first[:-lag], first[lag:])) < bound, lag
        assert abs(corr(first[:-lag] ** 2, first[lag:] ** 2)) < 2 * bound, lag
    for s in range(1, 4):  # across the samples of n
        assert abs(corr(many[0], many[s])) < bound
    for s in range(4):
        assert ks_distance(many[s]) < 1.95 / math.sqrt(many.shape[1])


def test_streams_separate_ranks(device):
    zeros = [torch.zeros(50_000, device=device)]
    torch.manual_seed(0)
    a, _, _ = K.sample_kernel(zeros, zeros, None, None, False, 1.0, None, None, 0)
    torch.manual_seed(0)
    b, _, _ = K.sample_kernel(zeros, zeros, None, None, False, 1.0, None, None, 1)
    assert abs(corr(a, b)) < 5 / math.sqrt(a.numel())


# --------------------------------------------------------------------------------------------
# Low-precision samples.


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [None, 2])
def test_low_precision_samples(device, out_dtype, n):
    r"""theta in bf16/fp16 is the fp32 theta rounded once; a low-precision gradient gives the
    same gradients of the means and of the log-variances as its fp32 value."""

    means, logvars = make_group(device)
    torch.manual_seed(4)
    theta32, kl32, state32 = K.sample_kernel(means, logvars, n, None, True, 1.0, None, None, 0)
    torch.manual_seed(4)
    theta, kl, state = K.sample_kernel(means, logvars, n, out_dtype, True, 1.0, None, None, 0)
    assert theta.dtype == out_dtype and kl.dtype == torch.float32
    assert torch.equal(state, state32) and torch.equal(kl, kl32)
    assert torch.equal(theta, theta32.to(out_dtype))

    g = torch.randn(theta.shape, device=device).to(out_dtype)
    grad_kl = torch.tensor(0.5, device=device)
    low = K.sample_backward_kernel(g, grad_kl, means, logvars, state, True, 1.0, None, None)
    full = K.sample_backward_kernel(
        g.float(), grad_kl, means, logvars, state, True, 1.0, None, None
    )
    for a, b in zip(low, full):
        assert a.dtype == torch.float32 and torch.equal(a, b)


def test_low_precision_rounding_of_special_values(device):
    r"""The kernels' fp32 -> bf16/fp16 rounding is PyTorch's: nearest even, overflow, NaN."""

    values = torch.tensor(
        [
            0.0,
            -0.0,
            1.0,
            1.00390625,
            1.01171875,
            3.0e38,
            -3.0e38,
            65504.0,
            65520.0,
            1e-8,
            6e-8,
            float("inf"),
            float("-inf"),
            float("nan"),
        ]
    )
    values = torch.cat([values, torch.randn(4000) * 100]).to(device)
    means, logvars = [values], [torch.full_like(values, -60.0)]
    for out_dtype in (torch.bfloat16, torch.float16):
        torch.manual_seed(0)
        theta32, _, _ = K.sample_kernel(means, logvars, None, None, False, 1.0, None, None, 0)
        torch.manual_seed(0)
        theta, _, _ = K.sample_kernel(means, logvars, None, out_dtype, False, 1.0, None, None, 0)
        torch.testing.assert_close(theta, theta32.to(out_dtype), rtol=0, atol=0, equal_nan=True)


def test_low_precision_group_reads_every_gradient_dtype(device):
    r"""A float16 group's samples in bfloat16, and gradients of the samples in float16,
    bfloat16 or float32, each read in place."""

    means, logvars = make_group(device, torch.float16, shapes=[(300,), (5, 7)])
    torch.manual_seed(2)
    theta, _, state = K.sample_kernel(
        means, logvars, None, torch.bfloat16, False, 1.0, None, None, 0
    )
    torch.manual_seed(2)
    theta16, _, _ = K.sample_kernel(means, logvars, None, None, False, 1.0, None, None, 0)
    assert theta.dtype == torch.bfloat16 and theta16.dtype == torch.float16
    torch.testing.assert_close(theta.float(), theta16.float(), rtol=2**-7, atol=1e-3)
    g = torch.randn(theta.shape, device=device)
    results = [
        K.sample_backward_kernel(
            g.to(dt),
            torch.tensor(0.0, device=device),
            means,
            logvars,
            state,
            False,
            1.0,
            None,
            None,
        )
        for dt in (torch.float16, torch.bfloat16, torch.float32)
    ]
    for grads in results:
        assert all(x.dtype == torch.float16 for x in grads)
    # float32 gradients are read as they are: the float32 group's results with the same
    # values, rounded once to float16.
    wide = [m.float() for m in means], [v.float() for v in logvars]
    zero = torch.tensor(0.0, device=device)
    expected = K.sample_backward_kernel(g, zero, *wide, state, False, 1.0, None, None)
    for got, want in zip(results[2], expected):
        assert torch.equal(got, want.to(torch.float16))


# --------------------------------------------------------------------------------------------
# Edge cases.


@pytest.mark.parametrize("n", [None, 0, 2])
def test_empty_and_scalar_tensors(device, n):
    means, logvars = make_group(device, shapes=[(0,), (), (0, 3), ()])
    theta, kl, state = K.sample_kernel(means, logvars, n, None, True, 1.0, None, None, 0)
    assert theta.shape == ((2,) if n is None else (n, 2))
    torch.testing.assert_close(kl, reference.kl(means, logvars))
    g = torch.ones(theta.shape, device=device)
    gm, gl = K.sample_backward_kernel(
        g, torch.tensor(1.0, device=device), means, logvars, state, True, 1.0, None, None
    )
    assert gm.shape == gl.shape == (2,)
    assert torch.isfinite(gm).all() and torch.isfinite(gl).all()


def test_all_empty_group(device):
    means, logvars = make_group(device, shapes=[(0,), (0, 5)])
    theta, kl, state = K.sample_kernel(means, logvars, None, None, True, 1.0, None, None, 0)
    assert theta.shape == (0,) and kl.item() == 0.0
    gm, gl = K.sample_backward_kernel(
        theta, torch.tensor(1.0, device=device), means, logvars, state, True, 1.0, None, None
    )
    assert gm.shape == gl.shape == (0,)
    assert K.variance_kernel(logvars).shape == (0,)
    assert K.kl_kernel(means, logvars, 1.0, None, None).item() == 0.0


def test_grad_kl_is_ignored_without_the_kl(device):
    means, logvars = make_group(device)
    _, kl, rng_state = K.sample_kernel(means, logvars, None, None, False, 1.0, None, None, 0)
    assert kl.shape == () and kl.item() == 0.0
    g = torch.randn(numel(means), device=device)
    args = (means, logvars, rng_state, False, 1.0, None, None)
    a = K.sample_backward_kernel(g, torch.tensor(5.0, device=device), *args)
    b = K.sample_backward_kernel(g, torch.tensor(0.0, device=device), *args)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_extreme_logvars(device):
    r"""softclip keeps sigma and the variance finite for any finite logvar. Past |logvar| of
    about 3e20 (fp32) (logvar / 18)^2 overflows, the scale rsqrt(inf) is 0 and softclip gives
    0 where the limit is +-18 (sigma 1, not exp(+-9)): the reference computes the same, and so
    does zuko's formula."""

    lv = torch.tensor([-1e30, -1e4, -100.0, -18.0, 0.0, 18.0, 100.0, 1e4, 1e30], device=device)
    means, logvars = [torch.zeros_like(lv)], [lv]
    theta, kl, _ = K.sample_kernel(means, logvars, None, None, True, 1.0, None, None, 0)
    assert torch.isfinite(theta).all() and torch.isfinite(kl)
    variance = K.variance_kernel(logvars)
    assert ulp_distance(variance, reference.variance(logvars)) <= tolerance_ulp(
        device, torch.float32
    )
    assert variance[0].item() == 1.0 and variance[-1].item() == 1.0  # the overflow, as the twin
    torch.testing.assert_close(
        variance[[1, -2]].cpu(), torch.tensor([math.exp(-18.0), math.exp(18.0)]), rtol=1e-3, atol=0
    )
    torch.testing.assert_close(kl, reference.kl(means, logvars))


# --------------------------------------------------------------------------------------------
# opcheck: schemas, fake kernels and the absence of autograd registration on the kernel ops.


# sample_kernel draws fresh noise on every call, so opcheck's comparisons of repeated calls
# (test_aot_dispatch_dynamic) cannot hold for it.
RANDOM_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(device, dtype):
    means, logvars = make_group(device, dtype)
    prior_means = [torch.randn_like(m) for m in means]
    prior = (0.5, [1.0 + i for i in range(len(means))], prior_means)
    theta, _, state = K.sample_kernel(means, logvars, 2, None, True, *prior, 0)
    grad = torch.randn_like(theta)
    grad_kl = torch.tensor(0.25, dtype=dtype, device=device)

    torch.library.opcheck(
        K.sample_kernel.default,
        (means, logvars, 2, None, True, *prior, 0),
        test_utils=RANDOM_UTILS,
    )
    torch.library.opcheck(
        K.sample_kernel.default,
        (means, logvars, None, torch.bfloat16, False, 1.0, None, None, 3),
        test_utils=RANDOM_UTILS,
    )
    torch.library.opcheck(
        K.sample_backward_kernel.default, (grad, grad_kl, means, logvars, state, True, *prior)
    )
    torch.library.opcheck(K.kl_kernel.default, (means, logvars, *prior))
    torch.library.opcheck(K.kl_backward_kernel.default, (grad_kl, means, logvars, *prior))
    torch.library.opcheck(K.variance_kernel.default, (logvars,))


# --------------------------------------------------------------------------------------------
# Constants: written once in csrc/common; the Python twins must agree.


def header_constant(name: str) -> str:
    import pathlib
    import re

    common = pathlib.Path(__file__).resolve().parent.parent / "csrc" / "common"
    text = "".join(p.read_text() for p in sorted(common.glob("*.h")))
    (value,) = re.findall(rf"constexpr \w+ {name} = ([^;]+);", text)
    return value.removesuffix("ull")


def test_python_constants_are_the_headers():
    assert float(header_constant("kSoftclipBound")) == reference.SOFTCLIP_BOUND
    assert int(header_constant("kSaltMix"), 16) == reference.SALT_MIX == SALT_MIX
    assert int(header_constant("kKeyDomain"), 16) == KEY_DOMAIN
