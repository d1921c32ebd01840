r"""CUDA-specific behaviour of the fused kernel ops ``fastbnf::<name>_kernel`` (csrc/cuda).

Parity with the reference, the noise stream against the NumPy Philox twin, statistics and bad
inputs are tested for every device in tests/test_kernels.py. Here: what only the CUDA kernels do
-- one launch per op whatever the number of tensors; the host-built tile map and the vector and
scalar paths on many small odd-sized tensors (against float64 formulas from the NumPy twin); a
KL that does not depend on the grid; the device-table cache across streams and under CUDA
graph capture (a training step captured without a warm-up, then eager calls); the domain
separation of fastbnf's Philox key from torch.randn's; a group of more than 2^31 elements; the
Adam step of row shards at their noise offsets (the vector and scalar paths at any shift); the
capturable Adam step (its count in a step_tensor, read on the device), eager and in a CUDA graph.

Everything here needs a GPU and the CUDA kernels, and skips cleanly without them.
"""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn as nn
from closed_form import Formulas, expected_eps, softclip64
from philox_twin import numpy_normals as _normals

import fastbnf
from fastbnf._backend import has_kernel

_CUDA = torch.cuda.is_available()

requires_cuda = pytest.mark.skipif(not _CUDA, reason="no CUDA GPU")
requires_cuda_kernel = pytest.mark.skipif(
    not (_CUDA and has_kernel("cuda")), reason="CUDA kernel not built"
)

pytestmark = [pytest.mark.cuda, requires_cuda, requires_cuda_kernel]

K = torch.ops.fastbnf


def make_group(
    dtype=torch.float32,
    shapes=((7, 3), (129,), (64, 33)),
    seed=0,
    lv_range=(-6.0, 2.0),
    device="cuda",
):
    generator = torch.Generator().manual_seed(seed)
    means = [torch.randn(s, generator=generator, dtype=torch.float64) for s in shapes]
    lo, hi = lv_range
    logvars = [
        torch.rand(s, generator=generator, dtype=torch.float64) * (hi - lo) + lo for s in shapes
    ]
    means = [m.to(device=device, dtype=dtype) for m in means]
    logvars = [v.to(device=device, dtype=dtype) for v in logvars]
    return means, logvars


# --------------------------------------------------------------------------------------------
# The tile map: many small odd-sized tensors, vector and scalar paths


def _many_small(layout, dtype=torch.float32):
    r"""3000 tensors of sizes 1 .. 997 (N odd, tensors starting at every offset mod 4): each
    its own allocation, or views of one buffer at an odd offset (no pointer 16-byte aligned)."""

    sizes = [(t * 37) % 997 + 1 for t in range(3000)]
    numel = sum(sizes)
    generator = torch.Generator().manual_seed(5)
    flat_mu = torch.randn(numel + 1, generator=generator, dtype=torch.float64)
    flat_lv = torch.rand(numel + 1, generator=generator, dtype=torch.float64) * 6 - 5
    flat_pm = torch.randn(numel + 1, generator=generator, dtype=torch.float64) * 0.1
    if layout == "views":
        cut = lambda flat: list(flat.to("cuda", dtype)[1:].split(sizes))
    else:
        cut = lambda flat: [t.clone() for t in flat.to("cuda", dtype)[1:].split(sizes)]
    prior_vars = [0.25 + (t % 7) * 0.5 for t in range(len(sizes))]
    return cut(flat_mu), cut(flat_lv), prior_vars, cut(flat_pm)


@pytest.mark.parametrize("layout", ["separate", "views"])
def test_tile_map_many_small_tensors(layout):
    means, logvars, prior_vars, prior_means = _many_small(layout)
    numel = sum(m.numel() for m in means)
    assert numel % 4 != 0 and numel > 100 * 4096  # rows k > 0 start mid Philox block
    f = Formulas(means, logvars, 1.0, prior_vars, prior_means)
    theta, kl, rng_state = K.sample_kernel(
        means, logvars, 2, None, True, 1.0, prior_vars, prior_means, 0
    )
    eps = expected_eps(rng_state, 2, numel)
    torch.testing.assert_close(theta.double().cpu(), f.theta(eps), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl.double().cpu(), f.kl(), rtol=1e-5, atol=0)

    alone = K.kl_kernel(means, logvars, 1.0, prior_vars, prior_means)
    assert torch.equal(alone, kl)  # the same tiles, the same order

    grad = torch.randn(theta.shape, device="cuda")
    grad_mu, grad_lv = K.sample_backward_kernel(
        grad,
        torch.tensor(1.5, device="cuda"),
        means,
        logvars,
        rng_state,
        True,
        1.0,
        prior_vars,
        prior_means,
    )
    exp_mu, exp_lv = f.grads(grad.double().cpu(), eps, 1.5)
    torch.testing.assert_close(grad_mu.double().cpu(), exp_mu, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_lv.double().cpu(), exp_lv, rtol=1e-5, atol=1e-5)

    # One sample (the paired vector path where aligned), the KL's backward and the variance.
    theta1, _, state1 = K.sample_kernel(means, logvars, None, None, False, 1.0, None, None, 0)
    torch.testing.assert_close(
        theta1.double().cpu(), f.theta(expected_eps(state1, 1, numel)[0]), rtol=1e-5, atol=1e-5
    )
    kl_mu, kl_lv = K.kl_backward_kernel(
        torch.tensor(2.0, device="cuda"), means, logvars, 1.0, prior_vars, prior_means
    )
    exp_mu, exp_lv = f.grads(
        torch.zeros(1, numel, dtype=torch.float64), torch.zeros(1, numel, dtype=torch.float64), 2.0
    )
    torch.testing.assert_close(kl_mu.double().cpu(), exp_mu, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kl_lv.double().cpu(), exp_lv, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        K.variance_kernel(logvars).double().cpu(), f.lc.exp(), rtol=1e-5, atol=0
    )


def test_kl_does_not_depend_on_the_grid():
    r"""Fixed-size tiles and a fixed-order reduction: bit for bit the same KL every time, from
    sample_kernel(with_kl) as from kl_kernel, on a group of large and small tensors."""

    sizes = [(1000, 1000), (3,), (77777,), (513, 257)]
    means, logvars = make_group(torch.float32, shapes=sizes)
    first = K.kl_kernel(means, logvars, 0.5, None, None)
    for _ in range(5):
        assert torch.equal(K.kl_kernel(means, logvars, 0.5, None, None), first)
        _, kl, _ = K.sample_kernel(means, logvars, None, None, True, 0.5, None, None, 0)
        assert torch.equal(kl, first)
    f = Formulas(means, logvars, 0.5)
    torch.testing.assert_close(first.double().cpu(), f.kl(), rtol=1e-6, atol=0)


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

    calls = {
        "sample": lambda: K.sample_kernel(means, logvars, None, None, True, 1.0, None, None, 0),
        "sample without KL": lambda: K.sample_kernel(
            means, logvars, None, None, False, 1.0, None, None, 0
        ),
        "sample_backward": lambda: K.sample_backward_kernel(
            grad_theta, grad_kl, means, logvars, rng_state, True, 1.0, None, None
        ),
        "kl": lambda: K.kl_kernel(means, logvars, 1.0, None, None),
        "kl_backward": lambda: K.kl_backward_kernel(grad_kl, means, logvars, 1.0, None, None),
        "variance": lambda: K.variance_kernel(logvars),
    }
    for name, call in calls.items():
        ours, kernels = fastbnf_kernels(call)
        assert len(ours) == 1 and len(kernels) == 1, (name, kernels)


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
# The device-table cache: streams and CUDA graphs


def test_table_from_another_stream():
    r"""A table built and uploaded on a busy stream, then used from a second stream: the second
    waits for the upload (an event), so its results are those of the first."""

    sizes = [(t * 53) % 2000 + 1 for t in range(300)]
    means, logvars = make_group(shapes=[(s,) for s in sizes], seed=11)
    first, second = torch.cuda.Stream(), torch.cuda.Stream()
    first.wait_stream(torch.cuda.current_stream())
    second.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(first):
        torch.cuda._sleep(50_000_000)  # the upload queues behind ~25 ms of work
        kl_first = K.kl_kernel(means, logvars, 1.0, None, None)
    with torch.cuda.stream(second):
        kl_second = K.kl_kernel(means, logvars, 1.0, None, None)
        var_second = K.variance_kernel(logvars)
        theta, _, state = K.sample_kernel(means, logvars, None, None, False, 1.0, None, None, 0)
    torch.cuda.synchronize()
    assert torch.equal(kl_first, kl_second)
    f = Formulas(means, logvars)
    torch.testing.assert_close(kl_second.double().cpu(), f.kl(), rtol=1e-5, atol=0)
    torch.testing.assert_close(var_second.double().cpu(), f.lc.exp(), rtol=1e-5, atol=0)
    eps = expected_eps(state, 1, theta.numel())[0]
    torch.testing.assert_close(theta.double().cpu(), f.theta(eps), rtol=1e-5, atol=1e-5)


class Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 5, bias=False)
        self.b = nn.Linear(8, 3, bias=False)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], dim=-1)


def _check_step_grads(bm, out, c, lam):
    r"""The gradients of a step are the exact ones of the noise it drew (recovered from the
    outputs: x = I gives W^T)."""

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


def test_cuda_graph_capture_without_warm_up():
    r"""A training step captured without a warm-up (the group's tables are first made during
    capture), then an eager step before any replay (it must not be served the captured tables,
    which only a replay fills), then replays that draw fresh noise with exact gradients."""

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

    def eager_step_checked():
        # bm.zero_grad(set_to_none=False): the gradients the graph reads stay in place.
        bm.zero_grad(set_to_none=False)
        out = step()
        torch.cuda.synchronize()
        _check_step_grads(bm, out.detach(), c, lam)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()

    eager_step_checked()  # before any replay

    outs = []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        out = static_out.detach().clone()
        outs.append(out)
        _check_step_grads(bm, out, c, lam)
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])

    eager_step_checked()  # and after the replays


# --------------------------------------------------------------------------------------------
# The Adam step of shards: noise_offsets


def _rows(tensor, rank, world):
    r"""Rank ``rank``'s rows of ``tensor`` as FSDP's Shard(0) cuts them (torch.chunk on dim 0),
    empty past the last chunk."""

    chunks = tensor.chunk(world)
    return chunks[rank] if rank < len(chunks) else tensor[:0]


# Shards of every kind at W = 2, 3, 4: vector-readable ones whose noise starts mid Philox block
# (6 x 6 and 512 x 8 at W = 2, 2000 x 4 across a tile at W = 2 and 4), scalar ones at any shift,
# quads that straddle shards of different shifts, and empty ones (1 x 6, and the first two
# tensors at W = 4).
_SHARDED = [(6, 6), (3, 3), (2000, 4), (7,), (3000, 5), (1, 6), (512, 8)]


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_adam_step_of_row_shards_is_the_rows_of_the_whole_step(dtype, world):
    r"""Each rank steps its rows of every tensor at their places in the whole group's noise
    (noise_offsets): two steps give, bit for bit, the rows of two steps of the whole group
    with the same keys (the means, log-variances, moments and next sample), and the same next
    rng_state, the generator's offset advanced alike."""

    means, logvars = make_group(dtype, shapes=_SHARDED, seed=3, lv_range=(-5.0, 0.0))
    generator = torch.Generator().manual_seed(4)
    prior_means = [0.1 * torch.randn(m.shape, generator=generator).to(m) for m in means]
    prior_vars = [0.5 + t for t in range(len(means))]
    begins = np.cumsum([0] + [m.numel() for m in means])[:-1].tolist()
    n = sum(m.numel() for m in means)
    grads = [torch.randn(n, generator=generator).to("cuda", dtype) for _ in range(2)]
    moments = (
        torch.randn(2 * n, generator=generator).to("cuda", dtype),
        torch.rand(2 * n, generator=generator).to("cuda", dtype),
    )
    torch.cuda.manual_seed(6)
    theta, _, first = K.sample_kernel(
        means, logvars, None, None, False, 1.0, prior_vars, prior_means, 0
    )

    def steps(mu, lv, exp_avgs, exp_avg_sqs, theta, grads, priors, offsets):
        state, states = first, []
        for step, grad in enumerate(grads, 3):
            torch.cuda.manual_seed(10 + step)  # the next key
            state = K.adam_step_kernel(
                grad, mu, lv, exp_avgs, exp_avg_sqs, theta, state, step, 1e-2, 0.9, 0.99, 1e-8,
                0.05, 0.3, 1.0, prior_vars, priors, 0, offsets,
            )  # fmt: skip
            states.append((state, torch.cuda.get_rng_state()))
        return states

    whole = [t.clone() for t in (*means, *logvars, *moments, theta)]
    count = len(means)
    states = steps(*_split(whole, count), grads, prior_means, None)

    for rank in range(world):
        mine = [_rows(t, rank, world) for t in (*means, *logvars)]
        offsets = [b + m.storage_offset() for b, m in zip(begins, mine[:count])]

        def local(flat):
            # The rank's rows of each tensor's piece of a flat array of the group, flat.
            pieces = [flat[b : b + m.numel()].view_as(m) for b, m in zip(begins, means)]
            return torch.cat([_rows(p, rank, world).reshape(-1) for p in pieces])

        ours = [t.clone() for t in mine]
        ours += [torch.cat([local(m[:n]), local(m[n:])]) for m in moments]
        ours.append(local(theta))
        priors = [_rows(m, rank, world).clone() for m in prior_means]
        got = steps(*_split(ours, count), [local(g) for g in grads], priors, offsets)

        for (state, rng), (expected_state, expected_rng) in zip(got, states):
            assert torch.equal(state, expected_state)
            assert torch.equal(rng, expected_rng)
        for t in range(2 * count):
            assert torch.equal(ours[t], _rows(whole[t], rank, world)), (rank, t)
        for t, flat in enumerate(whole[2 * count : 2 * count + 2]):
            assert torch.equal(ours[2 * count + t], torch.cat([local(flat[:n]), local(flat[n:])]))
        assert torch.equal(ours[-1], local(whole[-1]))


def _split(tensors, count):
    r"""``[*means, *logvars, exp_avgs, exp_avg_sqs, theta]`` as adam_step_kernel's arguments."""

    return tensors[:count], tensors[count : 2 * count], *tensors[2 * count :]


# --------------------------------------------------------------------------------------------
# The capturable Adam step: step_tensor

_ADAM = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.05, kl_weight=0.3)
# A group with a 4-aligned flat length, vector-readable tensors and scalar ones.
_ADAM_SHAPES = ((7, 3), (129,), (64, 33), (100, 8), (3,))


def _adam_state(dtype, seed=7):
    r"""``[*means, *logvars, exp_avgs, exp_avg_sqs, theta]`` of a group, non-zero moments, and
    the rng_state of its sample theta."""

    means, logvars = make_group(dtype, shapes=_ADAM_SHAPES, seed=seed, lv_range=(-5.0, 0.0))
    n = sum(m.numel() for m in means)
    assert n % 4 == 0
    generator = torch.Generator().manual_seed(seed)
    exp_avgs = (0.1 * torch.randn(2 * n, generator=generator)).to("cuda", dtype)
    exp_avg_sqs = (0.01 * torch.rand(2 * n, generator=generator)).to("cuda", dtype)
    torch.cuda.manual_seed(seed)
    theta, _, rng_state = K.sample_kernel(means, logvars, None, None, False, 1.0, None, None, 0)
    return [*means, *logvars, exp_avgs, exp_avg_sqs, theta], rng_state


def _adam_call(state, grad, rng_state, step, step_tensor=None):
    r"""One adam_step_kernel call on ``state`` (updated in place); the next rng_state."""

    means, logvars, exp_avgs, exp_avg_sqs, theta = _split(state, len(_ADAM_SHAPES))
    a = _ADAM
    return K.adam_step_kernel(
        grad, means, logvars, exp_avgs, exp_avg_sqs, theta, rng_state, step, a["lr"],
        a["beta1"], a["beta2"], a["eps"], a["weight_decay"], a["kl_weight"], 1.0, None, None,
        0, None, step_tensor,
    )  # fmt: skip


def _device_powers_are_the_hosts(t):
    r"""Whether the bias corrections of count t that a capturable step computes on the device
    are the host's: the device's powers are correctly rounded (beta^t by squaring in
    double-double, y^0.5 as sqrt; csrc/common/adam_math.h), the host's those of the C library's
    pow (which Python's math.pow calls too), within 0.52 ulp and so not always correctly
    rounded. Where they differ a capturable step differs from an eager one in the last bit."""

    beta1, beta2 = _ADAM["beta1"], _ADAM["beta2"]
    host1, host2 = math.pow(beta1, t), math.pow(beta2, t)
    exact1, exact2 = float(Fraction(beta1) ** t), float(Fraction(beta2) ** t)  # rounded once
    return (
        host1 == exact1
        and host2 == exact2
        and math.pow(1.0 - host2, 0.5) == math.sqrt(1.0 - host2)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("t", [1, 2, 7])
def test_step_tensor_step_is_the_step_of_its_count(t, dtype):
    r"""adam_step_kernel with step_tensor holding t (and a host step it ignores) gives, bit for
    bit, the means, log-variances, moments, theta and next rng_state of the call with step=t:
    the scalars of the count computed on the device are the host's (for these betas and counts
    the device's powers and the host's pow agree, which the test checks first)."""

    assert _device_powers_are_the_hosts(t)
    state, rng_state = _adam_state(dtype)
    generator = torch.Generator().manual_seed(8)
    grad = torch.randn(state[-1].numel(), generator=generator).to("cuda", dtype)
    step_tensor = torch.tensor(t, device="cuda")
    runs = []
    for with_tensor in (False, True):
        ours = [x.clone() for x in state]
        torch.cuda.manual_seed(21)  # the next key
        if with_tensor:
            next_state = _adam_call(ours, grad, rng_state, 100, step_tensor)
        else:
            next_state = _adam_call(ours, grad, rng_state, t)
        runs.append([*ours, next_state])
    for index, (eager, capturable) in enumerate(zip(*runs)):
        assert torch.equal(eager, capturable), index
    assert step_tensor.item() == t  # read, not written
    # The step changed everything (the same scalars were not merely left alone).
    assert not any(torch.equal(x, y) for x, y in zip(state, runs[0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_captured_step_tensor_steps_equal_eager_ones(dtype):
    r"""Adam steps captured in a CUDA graph, the count incremented in place before each call and
    the key copied in place after it: each replay steps with the counts that the tensor holds
    then and fresh keys (the generator's graph-safe offset advances per replay), so that R
    replays equal, bit for bit, R times the same calls made eagerly from the same state and the
    same CUDA generator state, and leave the generator where the eager calls leave it."""

    calls, replays, start = 3, 4, 2  # counts 3, 4, ..., 14
    state, first = _adam_state(dtype)
    generator = torch.Generator().manual_seed(9)
    n = state[-1].numel()
    grads = [torch.randn(n, generator=generator).to("cuda", dtype) for _ in range(calls)]

    def run(tensors, rng_state, count):
        for grad in grads:
            count.add_(1)
            next_state = _adam_call(tensors, grad, rng_state, 1, count)
            rng_state.copy_(next_state)

    def reset(tensors, rng_state, count):
        for x, x0 in zip(tensors, state):
            x.copy_(x0)
        rng_state.copy_(first)
        count.fill_(start)

    static = [x.clone() for x in state]
    static_rng, static_count = first.clone(), torch.full((1,), start, device="cuda")
    # Warm up on a side stream (PyTorch's CUDA graphs docs), then capture.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run(static, static_rng, static_count)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run(static, static_rng, static_count)
    reset(static, static_rng, static_count)  # in place: the graph reads these tensors

    torch.cuda.manual_seed(33)
    replayed = []
    for _ in range(replays):
        graph.replay()
        replayed.append([x.clone() for x in (*static, static_rng, static_count)])
    rng_after_replays = torch.cuda.get_rng_state()

    eager = [x.clone() for x in state]
    eager_rng, eager_count = first.clone(), torch.full((1,), start, device="cuda")
    torch.cuda.manual_seed(33)
    for r in range(replays):
        run(eager, eager_rng, eager_count)
        for index, (got, expected) in enumerate(
            zip(replayed[r], (*eager, eager_rng, eager_count))
        ):
            assert torch.equal(got, expected), (r, index)
    assert torch.equal(torch.cuda.get_rng_state(), rng_after_replays)
    assert eager_count.item() == start + calls * replays
    # Each replay drew fresh keys and stepped on.
    assert not torch.equal(replayed[0][-2], replayed[1][-2])
    assert not torch.equal(replayed[0][0], replayed[1][0])


def test_step_tensor_on_the_host_is_refused():
    state, rng_state = _adam_state(torch.float32)
    grad = torch.zeros_like(state[-1])
    with pytest.raises(ValueError, match="step_tensor must be an int64 tensor of one element"):
        _adam_call(state, grad, rng_state, 1, torch.tensor(1))


# --------------------------------------------------------------------------------------------
# Domain separation of the Philox key


def correlation(a, b):
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return (a * b).mean().item() / (a.std().item() * b.std().item())


def test_eps_independent_of_torch_randn():
    r"""fastbnf keys Philox with philox_key(seed), torch.randn with the seed itself: for the
    same seed and offset, and for a torch.randn that follows, the streams are uncorrelated."""

    numel = 1 << 20
    zeros = [torch.zeros(numel, device="cuda")]
    bound = 5.0 / math.sqrt(numel)

    torch.manual_seed(1234)
    eps, _, _ = K.sample_kernel(zeros, zeros, None, None, False, 1.0, None, None, 0)
    following = torch.randn(numel, device="cuda")
    torch.manual_seed(1234)
    same_offset = torch.randn(numel, device="cuda")

    assert abs(correlation(eps, following)) < bound
    assert abs(correlation(eps, same_offset)) < bound
    assert not torch.equal(eps, same_offset)
    # Nor shifted copies of each other (a shared counter space, lag 4 elements per block).
    for lag in (4, 8, 16):
        assert abs(correlation(eps[lag:], same_offset[:-lag])) < bound
        assert abs(correlation(eps[:-lag], same_offset[lag:])) < bound


# --------------------------------------------------------------------------------------------
# More than 2^31 elements

_BIG_BYTES = 40 * 2**30  # the group (shared zeros), theta and the two gradients in float32


def test_group_over_2_31_elements():
    free, _ = torch.cuda.mem_get_info()
    if free < _BIG_BYTES:
        pytest.skip(
            f"needs {_BIG_BYTES / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.1f} GiB free"
        )
    head, tail = (1 << 31) - 3, 13
    numel = head + tail
    zeros_head = torch.zeros(head, device="cuda")
    zeros_tail = torch.zeros(tail, device="cuda")
    # mu = 0 and logvar = 0 (the same zeros read as both): theta = eps.
    means = logvars = [zeros_head, zeros_tail]
    theta, kl, rng_state = K.sample_kernel(means, logvars, None, None, True, 2.0, None, None, 0)
    picks = np.array([0, 5, head - 1, head, (1 << 31) - 1, 1 << 31, numel - 1], dtype=np.uint64)
    idx = torch.from_numpy(picks.astype(np.int64)).cuda()
    salted_seed, offset = rng_state.cpu().tolist()
    expected = torch.from_numpy(_normals(salted_seed, offset, picks))
    torch.testing.assert_close(theta[idx].double().cpu(), expected, rtol=1e-5, atol=1e-5)
    # Each element adds 0.5 * (1/2 + log 2 - 1) to the KL.
    term = 0.5 * (0.5 + math.log(2.0) - 1.0)
    assert kl.item() == pytest.approx(numel * term, rel=1e-5)

    # grad_theta = eps: grad_mu = eps, grad_logvar = 0.5 * eps^2.
    grad_mu, grad_lv = K.sample_backward_kernel(
        theta, torch.zeros((), device="cuda"), means, logvars, rng_state, False, 1.0, None, None
    )
    torch.testing.assert_close(grad_mu[idx].double().cpu(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        grad_lv[idx].double().cpu(), 0.5 * expected**2, rtol=1e-5, atol=1e-5
    )
    # The last tensor's elements and the tail of the first, past 2^31, all written.
    assert torch.isfinite(grad_lv[-64:]).all() and (grad_lv[-64:] >= 0).all()
