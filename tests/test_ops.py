r"""Tests of the ops on every CPU backend: values, gradients, noise statistics, registration."""

import math
import pytest
import torch

from fastbnf import ops, reference
from fastbnf.ops.library import OP_NAMES

SHAPES = [(7, 3), (), (0, 4), (129,), (2, 3, 5)]


def make_group(dtype=torch.float32, shapes=SHAPES, seed=0, requires_grad=True):
    generator = torch.Generator().manual_seed(seed)
    means = [torch.randn(s, generator=generator, dtype=dtype) for s in shapes]
    logvars = [torch.rand(s, generator=generator, dtype=dtype) * 8 - 6 for s in shapes]
    for t in means + logvars:
        t.requires_grad_(requires_grad)
    return means, logvars


def flat(tensors):
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def recovered_eps(theta, means, logvars):
    sigma = reference.softclip(flat(logvars)).div(2).exp()
    return (theta.detach() - flat(means)) / sigma


def closed_form_kl(means, logvars, var=1.0, prior_means=None):
    mu, lv = flat(means).double(), reference.softclip(flat(logvars).double())
    m = 0.0 if prior_means is None else flat(prior_means).double()
    return (0.5 * (lv.exp() / var + (mu - m) ** 2 / var + math.log(var) - lv - 1)).sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kl_matches_closed_form(backend, dtype):
    means, logvars = make_group(dtype)
    kl = ops.kl(means, logvars, ops.Prior(2.5))

    assert kl.dtype == dtype
    torch.testing.assert_close(kl.double(), closed_form_kl(means, logvars, 2.5), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [None, 3])
def test_sample_gradients_are_exact(backend, dtype, n):
    r"""d/d(mu, logvar) of sum(g * theta) + lam * KL against the closed form, eps from theta."""

    means, logvars = make_group(dtype)
    theta, kl, rng_state = ops.sample(means, logvars, n=n, with_kl=True, prior=ops.Prior(0.5))
    g = torch.randn_like(theta)
    lam = 0.3
    (g * theta).sum().add(lam * kl).backward()

    mu, lv = flat(means), flat(logvars)
    eps = recovered_eps(theta, means, logvars)
    sigma = reference.softclip(lv).div(2).exp()
    g_sum = g.sum(0) if n else g
    g_eps = (g * eps).sum(0) if n else g * eps

    expected_mu = g_sum + lam * mu / 0.5
    expected_lv = reference.softclip_grad(lv) * (
        0.5 * sigma * g_eps + lam * 0.5 * (reference.softclip(lv).exp() / 0.5 - 1)
    )

    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(flat([m.grad for m in means]), expected_mu, **tol)
    torch.testing.assert_close(flat([v.grad for v in logvars]), expected_lv, **tol)
    torch.testing.assert_close(kl.double(), closed_form_kl(means, logvars, 0.5), rtol=1e-6, atol=0)
    assert rng_state.dtype == torch.int64 and rng_state.shape == (2,)


@pytest.mark.parametrize("order", ["in order", "reversed", "gap"])
def test_split_gradients_in_one_buffer(backend, order):
    r"""Gradients of the split samples that lie back to back in one buffer (as the backward of
    ``cat`` hands them) are read in place; any other layout is flattened. Same result."""

    shapes = [(40, 40), (40,), (30, 30), (7,)]
    means, logvars = make_group(shapes=shapes)
    torch.manual_seed(0)
    views, _, _ = ops.sample(means, logvars, split=True)
    n = sum(v.numel() for v in views)
    g = torch.randn(n + 1)
    if order == "in order":
        grads = list(g[:n].split([v.numel() for v in views]))
    elif order == "reversed":
        grads = list(g[:n].split([v.numel() for v in reversed(views)]))[::-1]
    else:  # one element between the second and the third tensor
        sizes = [v.numel() for v in views]
        pieces = g.split([*sizes[:2], 1, *sizes[2:]])
        grads = [pieces[0], pieces[1], pieces[3], pieces[4]]
    torch.autograd.backward(views, [gr.view_as(v) for gr, v in zip(grads, views)])

    flat_grad = torch.cat([gr.reshape(-1) for gr in grads])
    eps = recovered_eps(torch.cat([v.detach().reshape(-1) for v in views]), means, logvars)
    sigma = reference.softclip(flat(logvars)).div(2).exp()
    expected_lv = reference.softclip_grad(flat(logvars)) * 0.5 * sigma * flat_grad * eps
    torch.testing.assert_close(flat([m.grad for m in means]), flat_grad, rtol=0, atol=0)
    torch.testing.assert_close(flat([v.grad for v in logvars]), expected_lv, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("with_kl", [False, True])
def test_unused_pieces_get_the_kl_gradient_alone(backend, with_kl):
    r"""Split samples of which the loss uses one: the others' means get no sample gradient (the
    KL's alone, or zeros), exactly as if they had been used with a zero gradient."""

    means, logvars = make_group(dtype=torch.float64)
    views, kl, _ = ops.sample(means, logvars, with_kl=with_kl, split=True)
    g = torch.randn_like(views[1])
    ((views[1] * g).sum() + (0.3 * kl if with_kl else 0)).backward()

    for i, (m, v) in enumerate(zip(means, logvars)):
        mu, lv = m.detach(), v.detach()
        grad = g if i == 1 else torch.zeros_like(mu)
        eps = recovered_eps(views[i].reshape(-1), [m], [v]).view_as(mu)
        sigma = reference.softclip(lv).div(2).exp()
        lam = 0.3 if with_kl else 0.0
        expected_mu = grad + lam * mu
        expected_lv = reference.softclip_grad(lv) * (
            0.5 * sigma * grad * eps + lam * 0.5 * (reference.softclip(lv).exp() - 1)
        )
        torch.testing.assert_close(m.grad, expected_mu, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(v.grad, expected_lv, rtol=1e-9, atol=1e-12)


def test_compiled_kernels_have_cpp_autograd_nodes(backend):
    r"""With the compiled kernels, the eager ops' nodes are C++ (fastbnf._C: no Python in the
    backward); the pure-PyTorch backend keeps its autograd.Functions. Both link a KL to the
    next sample of its group."""

    means, logvars = make_group()
    link = ops.Link()
    kl = ops.kl(means, logvars, link=link)
    views, _, _ = ops.sample(means, logvars, split=True, link=link)
    if backend == "torch":
        assert type(views[0].grad_fn).__name__ == "SampleBackward"
        assert type(kl.grad_fn).__name__ == "KLBackward"
    else:
        assert views[0].grad_fn.name() == "fastbnf::SampleBackward"
        assert kl.grad_fn.name() == "fastbnf::KLBackward"
        assert link.native
    # The sample's only input is the KL's node.
    assert [f for f, _ in views[0].grad_fn.next_functions] == [kl.grad_fn]


def test_sample_shapes_and_dtypes(backend):
    means, logvars = make_group()
    n_total = sum(m.numel() for m in means)

    theta, kl, _ = ops.sample(means, logvars)
    assert theta.shape == (n_total,) and theta.dtype == torch.float32
    assert kl.shape == () and kl.item() == 0.0

    theta, _, _ = ops.sample(means, logvars, n=4, out_dtype=torch.bfloat16)
    assert theta.shape == (4, n_total) and theta.dtype == torch.bfloat16

    views = ops.unflatten(theta, means)
    assert [v.shape for v in views] == [(4, *m.shape) for m in means]


def test_low_precision_samples_backpropagate_to_fp32(backend):
    means, logvars = make_group()
    theta, _, _ = ops.sample(means, logvars, out_dtype=torch.float16)
    theta.float().sum().backward()

    assert all(m.grad.dtype == torch.float32 for m in means)
    torch.testing.assert_close(flat([m.grad for m in means]), torch.ones(theta.numel()))


def test_empty_group(backend):
    means, logvars = make_group(shapes=[(0,), (0, 3)])
    theta, kl, _ = ops.sample(means, logvars, with_kl=True)

    assert theta.shape == (0,) and kl.item() == 0.0


def test_variance(backend):
    means, logvars = make_group(dtype=torch.float64)
    v = ops.variance(logvars)
    torch.testing.assert_close(v, reference.softclip(flat(logvars)).exp())
    assert torch.autograd.gradcheck(lambda *lv: ops.variance(lv), tuple(logvars))


def test_reproducible_under_seed_and_fork_rng(backend):
    means, logvars = make_group()

    torch.manual_seed(7)
    a, _, _ = ops.sample(means, logvars)
    with torch.random.fork_rng():
        b, _, _ = ops.sample(means, logvars)
    c, _, _ = ops.sample(means, logvars)
    torch.manual_seed(7)
    d, _, _ = ops.sample(means, logvars)

    assert torch.equal(b, c) and torch.equal(a, d)
    assert not torch.equal(a, b)


def test_backward_regenerates_the_same_noise(backend):
    means, logvars = make_group()
    theta, _, _ = ops.sample(means, logvars)
    (theta * theta.detach()).sum().backward()  # grad_theta = theta: grad_logvar sees eps twice

    eps = recovered_eps(theta, means, logvars)
    lv = flat(logvars)
    sigma = reference.softclip(lv).div(2).exp()
    expected = reference.softclip_grad(lv) * 0.5 * sigma * theta.detach() * eps

    torch.testing.assert_close(flat([v.grad for v in logvars]), expected, rtol=1e-4, atol=1e-6)


def test_no_per_element_tensor_kept_for_backward(backend):
    means, logvars = make_group(shapes=[(1000, 100), (500,)])
    leaves = {t.untyped_storage().data_ptr() for t in means + logvars}
    kept = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in leaves:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        theta, kl, _ = ops.sample(means, logvars, with_kl=True)
        (theta.sum() + kl).backward()

    assert sum(kept.values()) <= 16  # the (seed, offset) pair


# Statistics of the noise: a counter-reuse bug shows only here. Each test seeds the generator:
# a bound that fails by chance with probability 1e-3 then fails always or never.


def noise(n=None, shapes=((400, 250), (100_000,)), dtype=torch.float64):
    means = [torch.zeros(s, dtype=dtype) for s in shapes]
    logvars = [torch.zeros(s, dtype=dtype) for s in shapes]
    theta, _, _ = ops.sample(means, logvars, n=n)
    return theta  # mu = 0, sigma = 1: theta is eps


def ks_distance(x: torch.Tensor) -> float:
    x = x.double().sort().values
    cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    i = torch.arange(1, len(x) + 1, dtype=torch.float64) / len(x)
    return max((i - cdf).abs().max().item(), (cdf - (i - 1 / len(x))).abs().max().item())


def correlation(a, b) -> float:
    return torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1].item()


def test_noise_is_standard_normal(backend):
    torch.manual_seed(0)
    eps = noise()
    n = eps.numel()

    assert abs(eps.mean().item()) < 5 / math.sqrt(n)
    assert abs(eps.var().item() - 1) < 5 * math.sqrt(2 / n)
    assert ks_distance(eps) < 1.63 / math.sqrt(n)  # 1% critical value of the KS test


def test_noise_is_uncorrelated(backend):
    torch.manual_seed(0)
    eps = noise()
    first, second = eps[:100_000], eps[100_000:]
    bound = 5 / math.sqrt(100_000)

    assert abs(correlation(first, second)) < bound  # across tensors
    for lag in (1, 2, 3, 4, 5, 8):  # inside a tensor, across Philox lanes and blocks
        assert abs(correlation(first[:-lag], first[lag:])) < bound
    assert abs(correlation(eps, noise())) < 5 / math.sqrt(eps.numel())  # across calls


def test_noise_is_independent_across_samples(backend):
    torch.manual_seed(0)
    eps = noise(n=4, shapes=((50_000,),))
    bound = 5 / math.sqrt(50_000)

    for i in range(4):
        for j in range(i + 1, 4):
            assert abs(correlation(eps[i], eps[j])) < bound
    assert ks_distance(eps.flatten()) < 1.63 / math.sqrt(eps.numel())


# Registration: gradcheck, opcheck, profiler, compile.


@pytest.mark.parametrize("with_kl", [False, True])
def test_gradcheck(backend, with_kl):
    means, logvars = make_group(torch.float64, shapes=[(3, 2), (4,)])
    n_means = len(means)

    def fn(*tensors):
        # The same noise on every call: gradcheck perturbs inputs and compares.
        with torch.random.fork_rng():
            torch.manual_seed(0)
            theta, kl, _ = ops.sample(tensors[:n_means], tensors[n_means:], n=2, with_kl=with_kl)
        return theta, kl

    assert torch.autograd.gradcheck(fn, (*means, *logvars))


@pytest.mark.parametrize("op", ["sample", "kl", "variance"])
def test_double_backward_is_a_clear_error(backend, op):
    r"""A backward that builds a graph fails at once, naming the op, rather than handing out
    gradients that look differentiable and are constants."""

    means, logvars = make_group(torch.float64, shapes=[(3,)])
    if op == "sample":
        out = ops.sample(means, logvars)[0].square().sum()
    elif op == "kl":
        out = ops.kl(means, logvars)
    else:
        out = ops.variance(logvars).square().sum()

    with pytest.raises(RuntimeError, match=f"fastbnf::{op} has no second derivatives"):
        torch.autograd.grad(out, [*means, *logvars], create_graph=True, allow_unused=True)
    (first,) = torch.autograd.grad(out, logvars[0])  # without a graph it works
    assert torch.isfinite(first).all()


def opcheck_inputs():
    # The ops have no autograd (fastbnf.ops' functions differentiate them): plain inputs.
    means, logvars = make_group(shapes=[(3, 2), (4,)], requires_grad=False)
    plain = means, logvars
    priors = [torch.randn(3, 2), torch.randn(4)]
    rng = torch.tensor([123, 0])
    prior = (0.5, [1.0, 2.0], priors)
    return {
        "kl": (means, logvars, *prior),
        "kl_backward": (torch.tensor(1.5), *plain, *prior),
        "variance": (logvars,),
        "sample_backward": (torch.randn(2, 10), torch.tensor(1.0), *plain, rng, True, *prior),
    }


@pytest.mark.parametrize("name", [n for n in OP_NAMES if n != "sample"])
def test_opcheck_deterministic_ops(backend, name):
    op = getattr(torch.ops.fastbnf, name)
    torch.library.opcheck(op, opcheck_inputs()[name])


def test_opcheck_sample(backend):
    r"""``sample`` draws fresh noise per call, so opcheck's reruns compare shapes only when the
    generator is not reset; reseeding before each call keeps every comparison exact."""

    means, logvars = make_group(shapes=[(3, 2), (4,)], requires_grad=False)
    args = (means, logvars, 2, None, True, 1.0, None, None, 0)

    class Reseed(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.fastbnf.sample.default or func is torch.ops.fastbnf.sample:
                torch.manual_seed(0)
            return func(*args, **(kwargs or {}))

    with Reseed():
        torch.library.opcheck(torch.ops.fastbnf.sample, args)


def test_ops_themselves_have_no_autograd(backend):
    r"""Autograd lives in fastbnf.ops' functions (two paths: tests/test_autograd_paths.py), not
    on the ops: a backward through an op itself fails, rather than computing anything."""

    means, logvars = make_group(shapes=[(3,)], requires_grad=True)
    kl = torch.ops.fastbnf.kl(means, logvars, 1.0, None, None)
    with pytest.raises(RuntimeError, match="fastbnf.kl.default but no autograd formula"):
        kl.backward()


def test_profiler_shows_one_call_per_group(backend):
    means, logvars = make_group()

    with torch.profiler.profile() as prof:
        theta, kl, _ = ops.sample(means, logvars, with_kl=True)
        (theta.sum() + kl).backward()

    names = [e.name for e in prof.events()]
    assert names.count("fastbnf::sample") == 1
    assert names.count("fastbnf::sample_backward") == 1


def test_compile_traces_a_step_without_graph_breaks(backend):
    means, logvars = make_group(shapes=[(8, 4), (8,)])

    def step(x):
        theta, kl, _ = ops.sample(means, logvars, with_kl=True)
        w, b = ops.unflatten(theta, means)
        return (x @ w.T + b).square().mean() + 1e-3 * kl

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(torch.randn(5, 4))
    loss.backward()

    assert torch.isfinite(loss)
    assert all(m.grad is not None and torch.isfinite(m.grad).all() for m in means + logvars)


@pytest.mark.parametrize("op", ["sample", "kl"])
def test_in_place_change_before_backward_is_an_error(backend, op):
    r"""The ops keep the parameters by reference, not with save_for_backward: they still refuse
    a backward after the parameters changed in place, as autograd does."""

    means, logvars = make_group()
    if op == "sample":
        theta, _, _ = ops.sample(means, logvars)
        loss = theta.sum()
    else:
        loss = ops.kl(means, logvars)
    with torch.no_grad():
        logvars[1].add_(1.0)
    with pytest.raises(RuntimeError, match=f"modified by an inplace operation.*fastbnf::{op}"):
        loss.backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [None, 3])
def test_reference_in_chunks(monkeypatch, dtype, n):
    r"""The pure-PyTorch twins work in chunks of whole tensors: with chunks of about 40
    elements every group here spans several, and the results are those of one chunk (the noise
    drawn chunk by chunk, alike forward and backward)."""

    monkeypatch.setenv("FASTBNF_BACKEND", "torch")
    monkeypatch.setattr(reference, "_CHUNK", 40)
    assert len(reference._chunks(make_group()[0])) == 3  # (21 + 1 + 0), 129, 30 elements

    test_kl_matches_closed_form("torch", dtype)
    test_sample_gradients_are_exact("torch", dtype, n)
    test_backward_regenerates_the_same_noise("torch")
    test_variance("torch")

    means, logvars = make_group(dtype)
    prior_means = [torch.randn_like(m) for m in means]
    prior_vars = [0.5, 2.0, 1.0, 3.0, 0.25]
    args = (2.0, prior_vars, prior_means)
    chunked = (
        reference.kl(means, logvars, *args),
        reference.kl_backward(torch.tensor(0.7, dtype=dtype), means, logvars, *args),
    )
    monkeypatch.setattr(reference, "_CHUNK", 1 << 21)
    whole = (
        reference.kl(means, logvars, *args),
        reference.kl_backward(torch.tensor(0.7, dtype=dtype), means, logvars, *args),
    )
    torch.testing.assert_close(chunked[0], whole[0])
    torch.testing.assert_close(chunked[1], whole[1], rtol=0, atol=0)
