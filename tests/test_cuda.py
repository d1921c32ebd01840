r"""Tests of the fused CUDA kernel ops ``fastbnf::<name>_kernel`` (csrc/cuda).

Values against the pure-PyTorch twins in :mod:`fastbnf.reference` and the formulas of
``csrc/README.md``; the noise stream against a NumPy Philox4x32-10 and against the CPU kernel for
the same ``rng_state``; fp32 / fp64 groups and bf16 / fp16 samples; statistics and independence
of the noise; one launch per op whatever the number of tensors; a deterministic KL; CUDA graph
capture of a training step; a group of more than 2^31 elements.

Everything here needs a GPU and the CUDA kernels, and skips cleanly without them.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import fastbnf

from fastbnf import reference
from fastbnf._backend import has_kernel
from philox_twin import numpy_normals as _normals

_CUDA = torch.cuda.is_available()

requires_cuda = pytest.mark.skipif(not _CUDA, reason="no CUDA GPU")
requires_cuda_kernel = pytest.mark.skipif(
    not (_CUDA and has_kernel("cuda")), reason="CUDA kernel not built"
)

pytestmark = [pytest.mark.cuda, requires_cuda, requires_cuda_kernel]

K = torch.ops.fastbnf

# Sizes that are not multiples of 4, a 0-dim tensor and an empty one: the vector and scalar paths.
SHAPES = [(7, 3), (), (0, 4), (129,), (2, 3, 5), (1,), (64, 33)]

FLOATS = [torch.float32, torch.float64]


def make_group(dtype=torch.float32, shapes=SHAPES, seed=0, lv_range=(-6.0, 2.0), device="cuda"):
    generator = torch.Generator().manual_seed(seed)
    means = [torch.randn(s, generator=generator, dtype=torch.float64) for s in shapes]
    lo, hi = lv_range
    logvars = [
        torch.rand(s, generator=generator, dtype=torch.float64) * (hi - lo) + lo for s in shapes
    ]
    means = [m.to(device=device, dtype=dtype) for m in means]
    logvars = [v.to(device=device, dtype=dtype) for v in logvars]
    return means, logvars


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def f64(tensors):
    return flat(tensors).double().cpu()


def softclip64(x):
    return x / torch.sqrt(1 + (x / 18.0) ** 2)


def numpy_normals(rng_state, j):
    r"""The normal of every flat sample index in ``j`` under ``rng_state``, in float64."""

    seed, offset = rng_state.tolist()
    return torch.from_numpy(_normals(seed, offset, j))


def expected_eps(rng_state, n_samples, numel):
    j = np.arange(n_samples * numel, dtype=np.uint64)
    return numpy_normals(rng_state.cpu(), j).reshape(n_samples, numel)


# Float32 eps from sqrtf / logf / cosf: a few ulp of each against the float64 formula.
EPS_TOL = dict(rtol=1e-5, atol=1e-5)


def prior_options(case, means):
    r"""(prior_var, prior_vars, prior_means) of a test case."""

    if case == "default":
        return 1.0, None, None
    if case == "scalar":
        return 0.3, None, None
    generator = torch.Generator().manual_seed(1)
    prior_vars = [0.5 + t for t in range(len(means))]
    prior_means = [
        torch.randn(m.shape, generator=generator, dtype=torch.float64).to(m) for m in means
    ]
    return 1.0, prior_vars, prior_means


def expected_kl(means, logvars, prior_var, prior_vars, prior_means):
    mu, lv = f64(means), softclip64(f64(logvars))
    sizes = [m.numel() for m in means]
    var = (
        torch.full_like(mu, prior_var)
        if prior_vars is None
        else torch.tensor(prior_vars, dtype=torch.float64).repeat_interleave(torch.tensor(sizes))
    )
    m0 = torch.zeros_like(mu) if prior_means is None else f64(prior_means)
    return 0.5 * (lv.exp() / var + (mu - m0) ** 2 / var + var.log() - lv - 1), m0, var


# --------------------------------------------------------------------------------------------
# Forward


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n", [None, 1, 3])
@pytest.mark.parametrize("prior", ["default", "scalar", "per_tensor"])
def test_sample(dtype, n, prior):
    means, logvars = make_group(dtype)
    prior_var, prior_vars, prior_means = prior_options(prior, means)
    theta, kl, rng_state = K.sample_kernel(
        means, logvars, n, None, True, prior_var, prior_vars, prior_means, 0
    )
    numel = sum(m.numel() for m in means)
    rows = 1 if n is None else n
    assert theta.shape == ((numel,) if n is None else (n, numel))
    assert theta.dtype == dtype and theta.device.type == "cuda"
    assert kl.shape == () and kl.dtype == dtype
    assert rng_state.dtype == torch.int64 and rng_state.shape == (2,)
    assert rng_state.device.type == "cuda"

    eps = expected_eps(rng_state, rows, numel)
    sigma = softclip64(f64(logvars)).div(2).exp()
    expected = f64(means) + sigma * eps
    torch.testing.assert_close(theta.double().cpu().reshape(rows, numel), expected, **EPS_TOL)

    terms, _, _ = expected_kl(means, logvars, prior_var, prior_vars, prior_means)
    torch.testing.assert_close(kl.double().cpu(), terms.sum(), rtol=1e-5, atol=1e-5)
    twin = reference.kl(means, logvars, prior_var, prior_vars, prior_means)
    torch.testing.assert_close(kl, twin, rtol=1e-5, atol=1e-5)


def test_sample_without_kl_gives_zero():
    means, logvars = make_group()
    _, kl, _ = K.sample_kernel(means, logvars, None, None, False, 1.0, None, None, 0)
    assert kl.item() == 0.0


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dtype", FLOATS)
def test_sample_low_precision_out(dtype, out_dtype):
    means, logvars = make_group(dtype, lv_range=(-4.0, 0.0))
    theta, kl, rng_state = K.sample_kernel(
        means, logvars, 2, out_dtype, True, 1.0, None, None, 0
    )
    assert theta.dtype == out_dtype and kl.dtype == dtype
    numel = theta.shape[1]
    eps = expected_eps(rng_state, 2, numel)
    expected = f64(means) + softclip64(f64(logvars)).div(2).exp() * eps
    # One rounding to the low-precision format: half an ulp, plus the fp32 eps error.
    ulp = 2.0**-7 if out_dtype == torch.bfloat16 else 2.0**-10
    torch.testing.assert_close(theta.double().cpu(), expected, rtol=ulp, atol=1e-4)

    grad = torch.randn(theta.shape, device="cuda").to(out_dtype)
    grad_mu, grad_lv = K.sample_backward_kernel(
        grad, torch.zeros((), dtype=dtype, device="cuda"), means, logvars, rng_state, False,
        1.0, None, None,
    )
    assert grad_mu.dtype == dtype and grad_lv.dtype == dtype
    g = grad.double().cpu()
    torch.testing.assert_close(grad_mu.double().cpu(), g.sum(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_group(dtype):
    r"""fp16 / bf16 means and logvars: arithmetic in fp32, results rounded once."""

    means, logvars = make_group(dtype, lv_range=(-4.0, 0.0))
    theta, kl, rng_state = K.sample_kernel(means, logvars, None, None, True, 1.0, None, None, 0)
    assert theta.dtype == dtype and kl.dtype == dtype
    eps = expected_eps(rng_state, 1, theta.numel())[0]
    expected = f64(means) + softclip64(f64(logvars)).div(2).exp() * eps
    torch.testing.assert_close(theta.double().cpu(), expected, rtol=1e-2, atol=1e-2)
    terms, _, _ = expected_kl(means, logvars, 1.0, None, None)
    torch.testing.assert_close(kl.double().cpu(), terms.sum(), rtol=1e-2, atol=1e-2)


def test_eps_matches_cpu_kernel():
    r"""For the same rng_state the CUDA and CPU kernels draw the same eps (to a few ulp).

    With mu = 0 and logvar = 0, theta = eps, and the logvar gradient of grad_theta = 1 is
    eps / 2.
    """

    if not has_kernel("cpu"):
        pytest.skip("CPU kernel not built")
    sizes = [(5,), (1000,), (3, 7), ()]
    zeros = [torch.zeros(s, device="cuda") for s in sizes]
    theta, _, rng_state = K.sample_kernel(zeros, zeros, 3, None, False, 1.0, None, None, 7)

    cpu_zeros = [z.cpu() for z in zeros]
    _, grad_lv = K.sample_backward_kernel(
        torch.ones(theta.shape), torch.zeros(()), cpu_zeros, cpu_zeros, rng_state.cpu(), False,
        1.0, None, None,
    )
    torch.testing.assert_close(theta.sum(0).cpu(), 2 * grad_lv, **EPS_TOL)

    # Row by row through the CUDA backward as well.
    _, grad_lv_cuda = K.sample_backward_kernel(
        torch.ones(theta.shape, device="cuda"), torch.zeros((), device="cuda"), zeros, zeros,
        rng_state, False, 1.0, None, None,
    )
    torch.testing.assert_close(grad_lv_cuda.cpu(), grad_lv, **EPS_TOL)


def test_eps_matches_numpy_philox_bits():
    r"""theta = eps for mu = 0, logvar = 0; against NumPy over several Philox blocks."""

    zeros = [torch.zeros(4099, device="cuda")]
    theta, _, rng_state = K.sample_kernel(zeros, zeros, 2, None, False, 1.0, None, None, 0)
    torch.testing.assert_close(theta.double().cpu(), expected_eps(rng_state, 2, 4099), **EPS_TOL)


# --------------------------------------------------------------------------------------------
# Backward, KL and variance


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n", [None, 3])
@pytest.mark.parametrize("with_kl", [False, True])
@pytest.mark.parametrize("prior", ["default", "per_tensor"])
def test_sample_backward(dtype, n, with_kl, prior):
    means, logvars = make_group(dtype)
    prior_var, prior_vars, prior_means = prior_options(prior, means)
    theta, _, rng_state = K.sample_kernel(
        means, logvars, n, None, with_kl, prior_var, prior_vars, prior_means, 0
    )
    grad_theta = torch.randn(theta.shape, dtype=dtype, device="cuda")
    grad_kl = torch.tensor(0.7, dtype=dtype, device="cuda")
    grad_mu, grad_lv = K.sample_backward_kernel(
        grad_theta, grad_kl, means, logvars, rng_state, with_kl, prior_var, prior_vars,
        prior_means,
    )
    numel = theta.shape[-1]
    rows = 1 if n is None else n
    eps = expected_eps(rng_state, rows, numel)
    g = grad_theta.double().cpu().reshape(rows, numel)
    x = f64(logvars)
    lv = softclip64(x)
    slope = (1 + (x / 18.0) ** 2) ** -1.5
    sigma = lv.div(2).exp()
    exp_mu = g.sum(0)
    exp_lv = slope * 0.5 * sigma * (g * eps).sum(0)
    if with_kl:
        _, m0, var = expected_kl(means, logvars, prior_var, prior_vars, prior_means)
        exp_mu = exp_mu + 0.7 * (f64(means) - m0) / var
        exp_lv = exp_lv + slope * 0.7 * 0.5 * (lv.exp() / var - 1)
    assert grad_mu.shape == (numel,) and grad_mu.dtype == dtype
    torch.testing.assert_close(grad_mu.double().cpu(), exp_mu, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_lv.double().cpu(), exp_lv, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("prior", ["default", "scalar", "per_tensor"])
def test_kl_and_backward(dtype, prior):
    means, logvars = make_group(dtype)
    prior_var, prior_vars, prior_means = prior_options(prior, means)
    kl = K.kl_kernel(means, logvars, prior_var, prior_vars, prior_means)
    twin = reference.kl(means, logvars, prior_var, prior_vars, prior_means)
    torch.testing.assert_close(kl, twin, rtol=1e-5, atol=1e-5)

    grad_kl = torch.tensor(1.3, dtype=dtype, device="cuda")
    out = K.kl_backward_kernel(grad_kl, means, logvars, prior_var, prior_vars, prior_means)
    twin = reference.kl_backward(grad_kl, means, logvars, prior_var, prior_vars, prior_means)
    for a, b in zip(out, twin):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", FLOATS)
def test_variance(dtype):
    _, logvars = make_group(dtype, lv_range=(-30.0, 30.0))
    out = K.variance_kernel(logvars)
    torch.testing.assert_close(out, reference.variance(logvars), rtol=1e-5, atol=0)


def test_kl_is_deterministic():
    r"""Fixed-size tiles and a fixed-order reduction: bit for bit the same KL every time, and
    the same from sample_kernel(with_kl) as from kl_kernel."""

    sizes = [(1000, 1000), (3,), (77777,), (513, 257)]
    means, logvars = make_group(torch.float32, shapes=sizes)
    first = K.kl_kernel(means, logvars, 0.5, None, None)
    for _ in range(10):
        assert torch.equal(K.kl_kernel(means, logvars, 0.5, None, None), first)
        _, kl, _ = K.sample_kernel(means, logvars, None, None, True, 0.5, None, None, 0)
        assert torch.equal(kl, first)
    terms, _, _ = expected_kl(means, logvars, 0.5, None, None)
    torch.testing.assert_close(first.double().cpu(), terms.sum(), rtol=1e-6, atol=0)


# --------------------------------------------------------------------------------------------
# RNG


def test_manual_seed_reproduces():
    means, logvars = make_group()
    torch.manual_seed(3)
    a, _, sa = K.sample_kernel(means, logvars, None, None, False, 1.0, None, None, 0)
    b, _, sb = K.sample_kernel(means, logvars, None, None, False, 1.0, None, None, 0)
    torch.manual_seed(3)
    c, _, sc = K.sample_kernel(means, logvars, None, None, False, 1.0, None, None, 0)
    assert torch.equal(a, c) and torch.equal(sa, sc)
    assert not torch.equal(a, b) and not torch.equal(sa, sb)
    with torch.random.fork_rng(devices=[torch.cuda.current_device()]):
        d, _, _ = K.sample_kernel(means, logvars, None, None, False, 1.0, None, None, 0)
    e, _, _ = K.sample_kernel(means, logvars, None, None, False, 1.0, None, None, 0)
    assert torch.equal(d, e)


def test_stream_is_folded_into_the_seed():
    means, logvars = make_group()
    torch.manual_seed(0)
    a, _, sa = K.sample_kernel(means, logvars, None, None, False, 1.0, None, None, 0)
    torch.manual_seed(0)
    b, _, sb = K.sample_kernel(means, logvars, None, None, False, 1.0, None, None, 5)
    assert not torch.equal(a, b)
    mix = 0x9E3779B97F4A7C15
    seed_a, seed_b = (int(s[0]) & (2**64 - 1) for s in (sa.cpu(), sb.cpu()))
    assert seed_a ^ seed_b == (5 * mix) & (2**64 - 1)
    assert sa[1].item() == sb[1].item()


def ks_distance(x):
    x = x.double().sort().values
    n = x.numel()
    cdf = torch.special.ndtr(x)
    grid = torch.arange(1, n + 1, dtype=torch.float64, device=x.device) / n
    return torch.maximum(grid - cdf, cdf - (grid - 1.0 / n)).abs().max().item()


def correlation(a, b):
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return (a * b).mean().item() / (a.std().item() * b.std().item())


def test_statistics():
    numel = (1 << 20) + 3
    sizes = [(numel // 2,), (numel - numel // 2,)]
    zeros = [torch.zeros(s, device="cuda") for s in sizes]
    eps, _, _ = K.sample_kernel(zeros, zeros, None, None, False, 1.0, None, None, 0)
    bound = 5.0 / math.sqrt(numel)
    assert abs(eps.double().mean().item()) < bound
    assert abs(eps.double().var().item() - 1.0) < 5.0 * math.sqrt(2.0 / numel)
    assert ks_distance(eps) < 1.95 / math.sqrt(numel)  # p ~ 0.001
    assert abs(correlation(eps[:-1], eps[1:])) < bound  # lag 1, inside a Philox block
    assert abs(correlation(eps[:-4], eps[4:])) < bound  # lag 4, across blocks
    half = numel // 2
    assert abs(correlation(eps[:half], eps[half : 2 * half])) < 1.5 * bound  # across tensors
    again, _, _ = K.sample_kernel(zeros, zeros, None, None, False, 1.0, None, None, 0)
    assert abs(correlation(eps, again)) < bound  # across calls


def test_samples_are_independent():
    r"""n samples of an N that is not a multiple of 4 (rows start mid Philox block)."""

    numel, n = 10001, 16
    zeros = [torch.zeros(numel, device="cuda")]
    eps, _, rng_state = K.sample_kernel(zeros, zeros, n, None, False, 1.0, None, None, 0)
    torch.testing.assert_close(eps.double().cpu(), expected_eps(rng_state, n, numel), **EPS_TOL)
    corr = torch.corrcoef(eps.double())
    off = corr - torch.eye(n, dtype=torch.float64, device="cuda")
    assert off.abs().max().item() < 5.0 / math.sqrt(numel)
    assert abs(eps.double().mean().item()) < 5.0 / math.sqrt(n * numel)


# --------------------------------------------------------------------------------------------
# One launch per op


def fastbnf_kernels(fn):
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == DeviceType.CUDA]
    kernels = [n for n in names if not n.startswith(("Memset", "Memcpy", "[memory]"))]
    return [n for n in kernels if "fastbnf" in n], kernels


@pytest.mark.parametrize("count", [10, 500])
def test_one_launch_kernel_ops(count):
    sizes = [((t * 37) % 300 + 1,) for t in range(count)]
    means, logvars = make_group(shapes=sizes)
    grad_kl = torch.ones((), device="cuda")
    theta, _, rng_state = K.sample_kernel(means, logvars, None, None, True, 1.0, None, None, 0)
    grad_theta = torch.ones_like(theta)

    def forward():
        K.sample_kernel(means, logvars, None, None, True, 1.0, None, None, 0)

    def backward():
        K.sample_backward_kernel(
            grad_theta, grad_kl, means, logvars, rng_state, True, 1.0, None, None
        )

    ours, kernels = fastbnf_kernels(forward)
    assert len(ours) == 1 and len(kernels) == 1, kernels
    ours, kernels = fastbnf_kernels(backward)
    assert len(ours) == 1 and len(kernels) == 1, kernels


class Many(nn.Module):
    def __init__(self, count):
        super().__init__()
        self.count = count
        for t in range(count):
            self.register_parameter(f"p{t}", nn.Parameter(torch.randn((t * 37) % 300 + 1)))

    def forward(self, x):
        return sum(getattr(self, f"p{t}").sum() for t in range(self.count)) * x


@pytest.mark.parametrize("style", ["fused", "seed"])
@pytest.mark.parametrize("count", [10, 500])
def test_one_launch_bayesian_model(count, style):
    r"""One launch forward and one backward (fused), or two forward (the KL, then the sample)
    and still one backward (seed style: the KL and the sample share it, ops.Link)."""

    bm = fastbnf.BayesianModel(Many(count).cuda(), init_logvar=-9.0)
    assert fastbnf.backend("cuda") == "cuda"
    x = torch.ones((), device="cuda")

    def step():
        if style == "fused":
            with bm.reparameterize(return_kl=True, prior_var=1.0) as (module, kl):
                loss = module(x) + kl
        else:
            kl = bm.kl_divergence()
            with bm.reparameterize() as module:
                loss = module(x) + kl
        loss.backward()

    step()  # the table upload happens once
    torch.cuda.synchronize()
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == DeviceType.CUDA]
    forward = [n for n in names if "fastbnf" in n and "forward_kernel" in n]
    backward = [n for n in names if "fastbnf" in n and "backward_kernel" in n]
    assert len(forward) == (1 if style == "fused" else 2) and len(backward) == 1, names


# --------------------------------------------------------------------------------------------
# CUDA graphs


class Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 5, bias=False)
        self.b = nn.Linear(8, 3, bias=False)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], dim=-1)


def test_cuda_graph_capture():
    r"""A captured training step draws fresh noise on every replay and its gradients are the
    exact ones of the noise it drew (recovered from the outputs: x = I gives W^T)."""

    torch.manual_seed(0)
    bm = fastbnf.BayesianModel(Pair().cuda(), init_logvar=-2.0)
    x = torch.eye(8, device="cuda")
    c = torch.randn(8, 8, device="cuda")
    lam = 0.01

    def step():
        with bm.reparameterize(return_kl=True, prior_var=1.0) as (module, kl):
            out = module(x)
            loss = (out * c).sum() + lam * kl
        loss.backward()
        return out

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            bm.zero_grad(set_to_none=True)
            step()
    torch.cuda.current_stream().wait_stream(side)

    bm.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()

    outs = []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        out = static_out.detach().clone()
        outs.append(out)
        thetas = {"a-weight": out[:, :5].T, "b-weight": out[:, 5:].T}
        grads = {"a-weight": c[:, :5].T, "b-weight": c[:, 5:].T}
        for key in ("a-weight", "b-weight"):
            mu = bm.means[key].detach().double()
            x_lv = bm.logvars[key].detach().double()
            lv = softclip64(x_lv)
            sigma = lv.div(2).exp()
            eps = (thetas[key].double() - mu) / sigma
            g = grads[key].double()
            slope = (1 + (x_lv / 18.0) ** 2) ** -1.5
            exp_mu = g + lam * mu
            exp_lv = slope * (0.5 * sigma * eps * g + lam * 0.5 * (lv.exp() - 1))
            torch.testing.assert_close(bm.means[key].grad.double(), exp_mu, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(bm.logvars[key].grad.double(), exp_lv, rtol=1e-4, atol=1e-5)
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])


# --------------------------------------------------------------------------------------------
# Errors


def test_errors_name_the_op():
    means, logvars = make_group()
    with pytest.raises(RuntimeError, match="fastbnf::sample_kernel"):
        K.sample_kernel(means, [v.cpu() for v in logvars], None, None, False, 1.0, None, None, 0)
    with pytest.raises(RuntimeError, match="fastbnf::kl_kernel"):
        K.kl_kernel(means, logvars[:-1], 1.0, None, None)
    with pytest.raises(RuntimeError, match="fastbnf::sample_kernel"):
        K.sample_kernel(means, logvars, None, None, True, -1.0, None, None, 0)
    with pytest.raises(RuntimeError, match="contiguous"):
        K.kl_kernel([means[0].T], [logvars[0].T], 1.0, None, None)


# --------------------------------------------------------------------------------------------
# More than 2^31 elements


def _free_bytes():
    free, _ = torch.cuda.mem_get_info()
    return free


@pytest.mark.skipif(not _CUDA or _free_bytes() < 40 * 2**30, reason="needs > 40 GB of GPU memory")
def test_group_over_2_31_elements():
    head, tail = (1 << 31) - 3, 13
    numel = head + tail
    means = [torch.zeros(head, device="cuda"), torch.zeros(tail, device="cuda")]
    logvars = [torch.zeros(head, device="cuda"), torch.zeros(tail, device="cuda")]
    theta, kl, rng_state = K.sample_kernel(means, logvars, None, None, True, 2.0, None, None, 0)
    # mu = 0, logvar = 0: theta = eps, and each element adds 0.5 * (1/2 + log 2 - 1) to the KL.
    picks = np.array([0, 5, head - 1, head, (1 << 31) - 1, 1 << 31, numel - 1], dtype=np.uint64)
    got = theta[torch.from_numpy(picks.astype(np.int64)).cuda()].double().cpu()
    torch.testing.assert_close(got, numpy_normals(rng_state.cpu(), picks), **EPS_TOL)
    term = float(np.float32(0.5) * (np.float32(0.5) + np.float32(math.log(2.0)) - np.float32(1.0)))
    assert kl.item() == pytest.approx(numel * term, rel=1e-6)
    if _free_bytes() < 20 * 2**30:
        return
    grad_mu, grad_lv = K.sample_backward_kernel(
        theta, torch.zeros((), device="cuda"), means, logvars, rng_state, False, 1.0, None, None
    )
    idx = torch.from_numpy(picks.astype(np.int64)).cuda()
    # grad_theta = eps: grad_mu = eps, grad_logvar = 0.5 * eps^2.
    torch.testing.assert_close(grad_mu[idx], theta[idx])
    torch.testing.assert_close(grad_lv[idx], 0.5 * theta[idx] ** 2, rtol=1e-6, atol=1e-6)
