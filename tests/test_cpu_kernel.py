r"""CPU-specific tests of the fused CPU kernel ops ``fastbnf::<name>_kernel`` (csrc/cpu).

Parity with the reference, the noise stream, seeds, statistics, edge cases and bad inputs are
tested for every device in tests/test_kernels.py. Here: determinism across thread counts (and
that the work was split), the generic (non-AVX2) path, the pool of large outputs, the build's
floating-point environment and the eager path's helpers.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from philox_twin import numpy_normals

import fastbnf
from fastbnf import reference
from fastbnf._backend import has_kernel

pytestmark = pytest.mark.skipif(not has_kernel("cpu"), reason="CPU kernel not built")

K = torch.ops.fastbnf

SHAPES = [(7, 3), (), (0, 4), (129,), (2, 3, 5), (1,)]


def make_group(dtype=torch.float32, shapes=SHAPES, seed=0, lv_range=(-6.0, 2.0)):
    generator = torch.Generator().manual_seed(seed)
    means = [torch.randn(s, generator=generator).to(dtype) for s in shapes]
    lo, hi = lv_range
    logvars = [(torch.rand(s, generator=generator) * (hi - lo) + lo).to(dtype) for s in shapes]
    return means, logvars


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


# --------------------------------------------------------------------------------------------
# Determinism across thread counts.


def big_group(dtype=torch.float32):
    # Sizes that cut chunks at odd places, about 40 chunks of 4096 elements in all: enough for
    # at::parallel_for (grain: 8 chunks) to split the work between threads.
    return make_group(dtype, shapes=[(70001,), (3,), (), (333, 257), (0,), (5000,)], seed=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [None, 2])
def test_same_results_for_any_thread_count(dtype, n):
    means, logvars = big_group(dtype)
    prior_means = [torch.randn_like(m) for m in means]
    args = (0.8, None, prior_means)
    results, used = [], []
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
            # How many threads ran chunks of that last call (recorded by the kernels).
            used.append((torch.get_num_threads(), K.cpu_threads_used()))
            results.append((theta, kl, state, *grads, kl_only))
    finally:
        torch.set_num_threads(threads)
    # The work was split: more than one thread ran whenever more than one was there.
    assert used[0] == (1, 1)
    for available, ran in used[1:]:
        assert available > 1 and ran > 1, used
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
    assert torch.equal(results[0][1], results[0][-1])  # same KL with or without sampling


def run_script(script: str, name: str, env: dict):
    r"""Runs ``script`` in a fresh process (argv: this folder, an output file); returns what it
    saved with torch.save."""

    out = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"fastbnf_{name}_{os.getpid()}.pt")
    subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), os.path.dirname(__file__), out],
        check=True,
        env=dict(os.environ, **env),
    )
    try:
        return torch.load(out)
    finally:
        os.remove(out)


def test_same_results_with_one_openmp_thread():
    r"""A fresh process with OMP_NUM_THREADS=1 gives bitwise the same theta and KL."""

    means, logvars = big_group()
    torch.manual_seed(5)
    theta, kl, _ = K.sample_kernel(means, logvars, None, None, True, 1.0, None, None, 0)
    script = """
        import sys, torch, fastbnf
        from fastbnf._backend import has_kernel
        assert has_kernel("cpu")
        sys.path.insert(0, sys.argv[1])
        from test_cpu_kernel import big_group
        means, logvars = big_group()
        torch.manual_seed(5)
        theta, kl, _ = torch.ops.fastbnf.sample_kernel(
            means, logvars, None, None, True, 1.0, None, None, 0)
        used = torch.ops.fastbnf.cpu_threads_used()
        torch.save((theta, kl, torch.get_num_threads(), used), sys.argv[2])
        """
    theta1, kl1, threads1, used1 = run_script(script, "omp1", dict(OMP_NUM_THREADS="1"))
    assert threads1 == 1 and used1 == 1
    assert torch.equal(theta, theta1) and torch.equal(kl, kl1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_generic_path_draws_the_same_stream(dtype):
    r"""FASTBNF_CPU_ISA=generic forces the kernels' baseline path (no AVX2, no FMA): the same
    stream and the same results, bitwise where no polynomial is involved (the mean's gradient),
    within a few ulp elsewhere: the AVX2 path's polynomials use FMA, so the float32 noise differs
    by an ulp here and there. In float64 both paths take PyTorch's exp: the variance and the KL
    are bitwise equal."""

    means, logvars = big_group(dtype)
    torch.manual_seed(5)
    theta, kl, state = K.sample_kernel(means, logvars, 3, None, True, 1.0, None, None, 0)
    g = torch.linspace(-1, 1, theta.numel(), dtype=dtype).reshape(theta.shape)
    grads = K.sample_backward_kernel(
        g, torch.tensor(0.3), means, logvars, state, True, 1.0, None, None
    )
    script = f"""
        import sys, torch, fastbnf
        from fastbnf._backend import has_kernel
        assert has_kernel("cpu")
        sys.path.insert(0, sys.argv[1])
        from test_cpu_kernel import big_group
        K = torch.ops.fastbnf
        dtype = {dtype}
        means, logvars = big_group(dtype)
        torch.manual_seed(5)
        theta, kl, state = K.sample_kernel(means, logvars, 3, None, True, 1.0, None, None, 0)
        g = torch.linspace(-1, 1, theta.numel(), dtype=dtype).reshape(theta.shape)
        grads = K.sample_backward_kernel(
            g, torch.tensor(0.3), means, logvars, state, True, 1.0, None, None)
        variance = K.variance_kernel(logvars)
        torch.save((theta, kl, state, *grads, variance), sys.argv[2])
        """
    other = run_script(script, "generic", dict(FASTBNF_CPU_ISA="generic"))
    assert torch.equal(state, other[2])
    assert torch.equal(grads[0], other[3])
    noise = dict(rtol=2e-6, atol=2e-6)  # the float32 noise's ulps
    exact = dict(rtol=2e-6, atol=0) if dtype == torch.float32 else dict(rtol=0, atol=0)
    torch.testing.assert_close(theta, other[0], **noise)
    torch.testing.assert_close(grads[1], other[4], **noise)
    torch.testing.assert_close(K.variance_kernel(logvars), other[5], **exact)
    torch.testing.assert_close(kl, other[1], **exact)


# --------------------------------------------------------------------------------------------
# The build's floating-point environment.


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
        eps[:1000].double(),
        torch.from_numpy(numpy_normals(*rng_state.tolist(), np.arange(1000))),
        rtol=1e-5,
        atol=1e-5,
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
    with pytest.raises(ValueError, match="the tensors hold 7 elements but flat has 6"):
        K.views_like(torch.zeros(6), like)
    with pytest.raises(ValueError, match=r"contiguous 1-dim tensor, got shape \(7, 1\)"):
        K.views_like(torch.zeros(7, 1), like)


@pytest.mark.parametrize("layout", ["in order", "reversed", "gap", "two storages", "transposed"])
def test_adjacent_flat_matches_the_python_twin(monkeypatch, layout):
    from fastbnf import _flat

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
    monkeypatch.setattr(_flat, "extension_loaded", lambda: False)
    twin = _flat.adjacent(tensors)
    if layout == "in order":
        assert torch.equal(compiled, buffer) and torch.equal(twin, buffer)
        assert compiled.data_ptr() == twin.data_ptr() == buffer.data_ptr()
    else:
        assert compiled is None and twin is None
