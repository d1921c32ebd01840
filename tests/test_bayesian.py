r"""Behaviour of BayesianModel, side by side with zuko.bayesian.BayesianModel."""

import math
import pytest
import torch
import torch.nn as nn
import zuko
import zuko.bayesian

from pathlib import Path
from torch.func import functional_call

import fastbnf

from fastbnf.ops.library import OP_NAMES

from zuko.flows import BPF, GF, MAF, NICE, NSF, SOSPF
from zuko.nn import MLP, MaskedMLP

PATTERNS = [
    (("",), ()),
    (("transform.transforms.*.hyper.4",), ("**.bias",)),
    (("**.hyper.4",), ()),
    (("transform",), ("transform.transforms.0",)),
    (("**.weight",), ("**.hyper.0",)),
    (("*.transforms.1.*",), ()),
]


def is_op_call(name):
    r"""A call of an op or its kernel, not of the extension's helpers (views_like, ...)."""

    return name.startswith("fastbnf::") and name[9:].removesuffix("_kernel") in OP_NAMES


def twins(base_fn, **kwargs):
    r"""A zuko and a fastbnf model over copies of the same base, with the same posterior."""

    torch.manual_seed(0)
    base = base_fn()
    zuko_model = zuko.bayesian.BayesianModel(base, **kwargs)
    ours = fastbnf.BayesianModel(copy_of(base), **kwargs)
    ours.load_state_dict(zuko_model.state_dict())
    return zuko_model, ours


def copy_of(module):
    import copy

    return copy.deepcopy(module)


@pytest.mark.parametrize("include, exclude", PATTERNS)
def test_same_selection_and_state_dict_keys(include, exclude):
    flow = NSF(3, 5, transforms=3)
    zuko_model = zuko.bayesian.BayesianModel(flow, include_params=include, exclude_params=exclude)
    ours = fastbnf.BayesianModel(copy_of(flow), include_params=include, exclude_params=exclude)

    assert list(ours.means.keys()) == list(zuko_model.means.keys())
    assert list(ours.state_dict().keys()) == list(zuko_model.state_dict().keys())


def test_same_initialization_under_the_same_seed():
    torch.manual_seed(1)
    zuko_model = zuko.bayesian.BayesianModel(MLP(5, 5), init_logvar=-7.0)
    torch.manual_seed(1)
    ours = fastbnf.BayesianModel(MLP(5, 5), init_logvar=-7.0)

    for key, value in zuko_model.state_dict().items():
        assert torch.equal(value, ours.state_dict()[key]), key


@pytest.mark.parametrize("prior_var", [1.0, 0.1, 3.0])
def test_same_kl_as_zuko(backend, prior_var):
    zuko_model, ours = twins(lambda: NSF(3, 5), init_logvar=-3.0)

    with torch.no_grad():
        for p in ours.logvars.values():
            p.normal_(0.0, 10.0)  # beyond the softclip bound too
    zuko_model.load_state_dict(ours.state_dict())

    expected = zuko_model.kl_divergence(prior_var).double()
    torch.testing.assert_close(ours.kl_divergence(prior_var).double(), expected, rtol=1e-5, atol=0)

    expected.backward()
    ours.kl_divergence(prior_var).backward()
    for key in ours.means:
        torch.testing.assert_close(ours.means[key].grad, zuko_model.means[key].grad)
        torch.testing.assert_close(ours.logvars[key].grad, zuko_model.logvars[key].grad)


def test_same_outputs_for_the_same_sampled_params(backend):
    zuko_model, ours = twins(lambda: NSF(3, 5, transforms=2), include_params=["**.hyper.4"])
    x, c = torch.randn(64, 3), torch.randn(5)

    torch.manual_seed(3)
    params = ours.sample_params()
    torch.manual_seed(3)
    with ours.reparameterize() as flow:
        log_p = flow(c).log_prob(x)

    zuko_model.sample_params = lambda: params  # zuko samples with its own RNG calls
    with zuko_model.reparameterize() as flow:
        log_p_zuko = flow(c).log_prob(x)

    torch.testing.assert_close(log_p, log_p_zuko)


def test_reparameterized_model_is_the_base_under_the_samples(backend):
    ours = fastbnf.BayesianModel(MLP(3, 5), init_logvar=-2.0)
    x = torch.randn(16, 3)

    torch.manual_seed(5)
    params = ours.sample_params()
    torch.manual_seed(5)
    with ours.reparameterize() as net:
        y = net(x)

    torch.testing.assert_close(y, functional_call(ours.base, params, (x,)))


def test_samples_follow_the_posterior(backend):
    _, ours = twins(lambda: nn.Linear(300, 200), init_logvar=-2.0)
    samples = ours.sample_params(n=16)["weight"]
    mean, logvar = ours.means["weight"], ours.logvars["weight"]
    eps = (samples - mean) / logvar.div(2).exp()  # |logvar| << 18: softclip ~ identity

    assert samples.shape == (16, 200, 300)
    assert abs(eps.mean().item()) < 5 / math.sqrt(eps.numel())
    assert abs(eps.std().item() - 1) < 0.01


def test_gradients_reach_the_posterior_only(backend):
    _, ours = twins(lambda: MLP(3, 5))

    with ours.reparameterize() as net:
        net(torch.randn(8, 3)).square().sum().backward()

    for key in ours.means:
        assert ours.means[key].grad is not None and ours.logvars[key].grad is not None
    for name, p in ours.base.named_parameters():
        assert p.grad is None and not p.requires_grad, name


@pytest.mark.parametrize("local_trick", [False, True])
@pytest.mark.parametrize("batch", [(), (64,)])
def test_mlp_behaviour(backend, local_trick, batch):
    ours = fastbnf.BayesianModel(MLP(3, 5))
    x = torch.randn(*batch, 3)

    with ours.reparameterize(local_trick=local_trick) as net:
        y1, y2 = net(x), net(x)
    with ours.reparameterize(local_trick=local_trick) as net:
        y3 = net(x)

    assert y1.shape == (*batch, 5) and y1.requires_grad
    assert torch.allclose(y1, y2) and not torch.allclose(y1, y3)

    net = ours.sample_model()
    y1, y2 = net(x), net(x)
    y3 = ours.sample_model()(x)

    assert y1.requires_grad and torch.allclose(y1, y2) and not torch.allclose(y1, y3)
    assert (ours.kl_divergence() >= 0).all()


def test_masked_mlp_keeps_its_jacobian_structure(backend):
    adjacency = torch.randn(5, 3) < 0
    ours = fastbnf.BayesianModel(MaskedMLP(adjacency))

    with ours.reparameterize() as net:
        jacobian = torch.autograd.functional.jacobian(net, torch.randn(3))

    assert (jacobian[~adjacency] == 0).all()


@pytest.mark.parametrize("F", [NICE, MAF, NSF, SOSPF, GF, BPF])
@pytest.mark.parametrize("local_trick", [False, True])
def test_flows(backend, tmp_path: Path, F, local_trick):
    bflow = fastbnf.BayesianModel(F(3, 5))
    x, c = torch.randn(256, 3), torch.randn(5)

    with bflow.reparameterize(local_trick=local_trick) as flow:
        log_p1, log_p2 = flow(c).log_prob(x), flow(c).log_prob(x)
    with bflow.reparameterize(local_trick=local_trick) as flow:
        log_p3 = flow(c).log_prob(x)
    (-log_p3.mean()).backward()

    assert log_p1.shape == (256,) and torch.allclose(log_p1, log_p2)
    assert not torch.allclose(log_p1, log_p3)
    for name, p in (*bflow.means.named_parameters(), *bflow.logvars.named_parameters()):
        assert p.grad is not None, name
    for name, p in bflow.base.named_parameters():
        assert p.grad is None, name

    bflow.zero_grad(set_to_none=True)
    sflow = bflow.sample_model()
    (-sflow(c).log_prob(x).mean()).backward()
    assert all(p.grad is None for p in bflow.parameters())
    assert all(p.grad is not None for p in sflow.parameters())

    with bflow.reparameterize(local_trick=local_trick) as flow:
        assert flow(c).sample((32,)).shape == (32, 3)
        transform = flow(torch.randn(256, 5)).transform
        assert torch.allclose(transform.inv(transform(x)), x, atol=1e-4)

    torch.save(bflow, tmp_path / "flow.pth")
    loaded = torch.load(tmp_path / "flow.pth", weights_only=False)
    with torch.random.fork_rng(), bflow.reparameterize(local_trick=local_trick) as flow:
        log_p = flow(c).log_prob(x)
    with torch.random.fork_rng(), loaded.reparameterize(local_trick=local_trick) as flow:
        log_p_loaded = flow(c).log_prob(x)

    assert torch.allclose(log_p, log_p_loaded)
    assert repr(bflow)


def test_return_kl_is_the_same_kl(backend):
    ours = fastbnf.BayesianModel(NSF(3, 5), init_logvar=-4.0)

    with ours.reparameterize(return_kl=True, prior_var=0.5) as (flow, kl):
        assert isinstance(flow, nn.Module)
        torch.testing.assert_close(kl, ours.kl_divergence(0.5))


def test_tied_parameters_share_one_posterior(backend):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Linear(4, 4)
            self.decoder = nn.Linear(4, 4)
            self.decoder.weight = self.encoder.weight

        def forward(self, x):
            return self.decoder(self.encoder(x))

    ours = fastbnf.BayesianModel(Tied(), init_logvar=-2.0)
    assert list(ours.means.keys()) == ["encoder-weight", "encoder-bias", "decoder-bias"]

    with ours.reparameterize() as net:
        assert net.encoder.weight is net.decoder.weight
        assert not torch.equal(net.encoder.weight, ours.means["encoder-weight"])


def test_names_with_dashes_work(backend):
    base = nn.ModuleDict({"in-proj": nn.Linear(2, 3)})
    ours = fastbnf.BayesianModel(base)
    mean = ours.means["in-proj-weight"]

    with ours.reparameterize() as net:
        assert not torch.equal(net["in-proj"].weight, mean)
    assert net["in-proj"].weight is base["in-proj"].weight


def test_call_with_a_function_runs_it_reparameterized(backend):
    ours = fastbnf.BayesianModel(nn.Linear(3, 2))
    x = torch.randn(4, 3)

    y = ours(lambda net, x: net(x), x)
    y.sum().backward()

    assert y.shape == (4, 2) and ours.means["weight"].grad is not None
    with pytest.raises(RuntimeError, match="should not be called directly"):
        ours(x)


def test_attribute_passthrough():
    ours = fastbnf.BayesianModel(nn.Linear(3, 2))
    assert ours.in_features == 3


def test_sample_dtype_in_an_autocast_step(backend):
    base = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    ours = fastbnf.BayesianModel(base, sample_dtype=torch.bfloat16)

    with torch.autocast("cpu", dtype=torch.bfloat16), ours.reparameterize() as net:
        assert net[0].weight.dtype == torch.bfloat16
        loss = net(torch.randn(4, 8)).float().square().mean()
    loss.backward()

    assert all(p.dtype == torch.float32 for p in ours.means.values())
    assert all(torch.isfinite(p.grad).all() for p in ours.means.values())


def test_sample_dtype_with_a_low_precision_base(backend):
    base = nn.Linear(8, 2).to(torch.bfloat16)
    ours = fastbnf.BayesianModel(base.float(), sample_dtype=torch.bfloat16)
    x = torch.randn(4, 8, dtype=torch.bfloat16)

    with ours.reparameterize() as net:
        y = net(x)
    y.float().sum().backward()

    assert y.dtype == torch.bfloat16
    assert ours.means["weight"].grad.dtype == torch.float32


def test_moving_to_another_dtype_regroups(backend):
    ours = fastbnf.BayesianModel(MLP(3, 5))
    ours.kl_divergence()
    ours.double()

    with ours.reparameterize() as net:
        y = net(torch.randn(2, 3, dtype=torch.float64))
    assert y.dtype == torch.float64


def test_groups_of_mixed_dtypes(backend):
    base = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2).double())
    ours = fastbnf.BayesianModel(base)

    with ours.reparameterize(return_kl=True) as (net, kl):
        assert net[0].weight.dtype == torch.float32 and net[1].weight.dtype == torch.float64
    kl.backward()

    torch.testing.assert_close(kl.double(), ours.kl_divergence().double())
    assert all(p.grad is not None for p in ours.means.values())


def test_op_calls_per_step_do_not_grow_with_tensors(backend):
    ours = fastbnf.BayesianModel(nn.Sequential(*[nn.Linear(4, 4) for _ in range(50)]))

    with torch.profiler.profile() as prof:
        kl = ours.kl_divergence()
        with ours.reparameterize() as net:
            (net(torch.randn(2, 4)).sum() + kl).backward()

    # The seed-style KL and the sample share one backward call (ops.Link).
    names = [e.name for e in prof.events() if is_op_call(e.name)]
    calls = ["fastbnf::kl", "fastbnf::sample", "fastbnf::sample_backward"]
    assert sorted(n for n in names if not n.endswith("_kernel")) == calls
    if backend == "cpp":
        assert sorted(n for n in names if n.endswith("_kernel")) == sorted(
            c + "_kernel" for c in calls
        )


@pytest.mark.parametrize("grad", [False, True])
def test_sample_model_inside_reparameterize(backend, grad):
    r"""The call the nested-context error recommends: a standalone sampled copy, whose
    parameters are parameters (tied ones still tied), while the context is active."""

    base = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    base[2].weight = base[0].weight  # tied
    bm = fastbnf.BayesianModel(base)
    x = torch.randn(2, 4)

    with torch.set_grad_enabled(grad), bm.reparameterize() as module:
        inside = module(x)
        copy = bm.sample_model()
        assert torch.equal(module(x), inside)  # the context's sample is untouched

    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in copy.parameters())
    assert not any(p is q for p in copy.parameters() for q in base.parameters())
    assert copy[0].weight is copy[2].weight
    copy(x).sum().backward()
    assert all(p.grad is not None for p in copy.parameters())


def test_loss_and_kl_backpropagated_separately(backend):
    r"""With return_kl=True the loss and the KL come from one op; separate backward calls
    still add up to the gradients of their sum, as with zuko."""

    bm = fastbnf.BayesianModel(nn.Linear(3, 2))
    x = torch.randn(4, 3)

    def step(separate):
        bm.zero_grad()
        torch.manual_seed(0)
        with bm.reparameterize(return_kl=True) as (module, kl):
            loss = module(x).square().sum()
        if separate:
            loss.backward()
            kl.backward()
        else:
            (loss + kl).backward()
        return {k: p.grad.clone() for k, p in bm.named_parameters() if p.grad is not None}

    together, apart = step(False), step(True)
    assert together.keys() == apart.keys() and len(together) == 4
    for key in together:
        torch.testing.assert_close(apart[key], together[key])
