r"""The fused local reparameterization trick: zuko's semantics, its statistics, its cost."""

import copy
import pytest
import torch
import torch.nn as nn
import zuko
import zuko.bayesian

from collections import Counter

import fastbnf
import fastbnf.ops

_randn = torch.randn


class FixedEta:
    r"""Replaces torch.randn (without a generator) by a stream fixed by call order.

    Both implementations draw the trick's eta with torch.randn, one call per layer in forward
    order, so they get the same eta. Calls with a generator (the reference backend's noise) are
    passed through.
    """

    def __init__(self):
        self.calls = 0

    def __call__(self, *shape, generator=None, **kwargs):
        if generator is not None:
            return _randn(*shape, generator=generator, **kwargs)
        self.calls += 1
        g = torch.Generator().manual_seed(1000 + self.calls)
        return _randn(*shape, generator=g, **kwargs)


def masked_mlp():
    adjacency = torch.rand(4, 5) < 0.6
    return zuko.nn.MaskedMLP(adjacency, hidden_features=(8, 8))


BASES = {
    "mlp": lambda: zuko.nn.MLP(5, 4, hidden_features=(8, 8), activation=nn.ELU),
    "masked-mlp": masked_mlp,
    "no-bias": lambda: nn.Sequential(nn.Linear(5, 8, bias=False), nn.Tanh(), nn.Linear(8, 4)),
}


def twins(name, **kwargs):
    torch.manual_seed(0)
    base = BASES[name]()
    zuko_model = zuko.bayesian.BayesianModel(base, init_logvar=-3.0, **kwargs)
    torch.manual_seed(0)
    ours = fastbnf.BayesianModel(BASES[name](), init_logvar=-3.0, **kwargs)
    ours.load_state_dict(zuko_model.state_dict())
    return zuko_model, ours


def grads(model):
    out = {}
    for key in model.means:
        out["m:" + key] = model.means[key].grad.clone()
        out["v:" + key] = model.logvars[key].grad.clone()
    model.zero_grad()
    return out


@pytest.mark.parametrize("name", BASES)
def test_same_outputs_and_gradients_as_zuko(backend, monkeypatch, name):
    zuko_model, ours = twins(name)
    x = torch.randn(6, 5)
    results = []

    for model in (zuko_model, ours):
        monkeypatch.setattr(torch, "randn", FixedEta())
        with model.reparameterize(local_trick=True) as m:
            y = m(x)
            y.square().sum().backward()
        results.append((y.detach(), grads(model)))

    (y_zuko, g_zuko), (y_ours, g_ours) = results
    torch.testing.assert_close(y_ours, y_zuko)
    assert g_zuko.keys() == g_ours.keys()
    for key in g_zuko:
        torch.testing.assert_close(g_ours[key], g_zuko[key], msg=key)


def single_layer(masked):
    torch.manual_seed(1)
    if masked:
        layer = zuko.nn.MaskedLinear(adjacency=torch.tensor([[1, 0, 1, 1]] * 3).bool())
    else:
        layer = nn.Linear(4, 3)
    return fastbnf.BayesianModel(layer, init_logvar=-1.5)


@pytest.mark.parametrize("masked", [False, True])
def test_variance_matches_monte_carlo_over_weights(backend, masked):
    bm = single_layer(masked)
    x = torch.randn(4)
    n = 20000

    with torch.no_grad():
        # n rows of the same input: the trick draws an independent eta per row.
        with bm.reparameterize(local_trick=True) as m:
            y_trick = m(x.expand(n, 4))
        # Monte Carlo over the weights themselves: n sampled layers.
        y_weights = bm.predict(x, samples=n)

    mask = bm.base.mask.float() if masked else torch.ones(3, 4)
    var_w = bm.logvars["weight"].detach().exp() * mask
    mean = (bm.means["weight"].detach() * mask) @ x + bm.means["bias"].detach()
    variance = var_w @ x.square() + bm.logvars["bias"].detach().exp()

    se = (variance / n).sqrt()
    for y in (y_trick, y_weights):
        assert ((y.mean(0) - mean).abs() < 5 * se).all()
        # The relative standard error of a variance estimate is sqrt(2 / n) = 1%.
        torch.testing.assert_close(y.var(0), variance, rtol=0.06, atol=0.0)


def test_eta_fixed_within_a_context_fresh_across(backend):
    bm = single_layer(False)
    x = torch.randn(5, 4)

    with bm.reparameterize(local_trick=True) as m:
        a, b = m(x), m(x)
        c = m(x[:3])  # another shape, another eta
    with bm.reparameterize(local_trick=True) as m:
        d = m(x)

    assert torch.equal(a, b)
    assert c.shape == (3, 3)
    assert not torch.allclose(a, d)

    # Outside the context the layer is deterministic again.
    assert torch.equal(bm.base(x), bm.base(x))


def test_zero_input_row_gives_finite_gradients(backend, monkeypatch):
    # A Linear without bias and an all-zero input row: the output variance is exactly 0.
    zuko_model, ours = twins("no-bias", include_params=["0"])
    x = torch.randn(4, 5)
    x[1] = 0.0

    for model in (zuko_model, ours):
        monkeypatch.setattr(torch, "randn", FixedEta())
        with model.reparameterize(local_trick=True) as m:
            m(x).sum().backward()

    # zuko: sqrt has an infinite slope at 0, and inf * 0 = NaN.
    assert torch.isnan(zuko_model.logvars["0-weight"].grad).any()
    # fastbnf clamps to the smallest normal: finite, and the same where zuko is finite.
    grad = ours.logvars["0-weight"].grad
    assert torch.isfinite(grad).all()
    finite = torch.isfinite(zuko_model.logvars["0-weight"].grad)
    torch.testing.assert_close(grad[finite], zuko_model.logvars["0-weight"].grad[finite])
    assert torch.isfinite(ours.means["0-weight"].grad).all()


def count_ops(monkeypatch):
    r"""Counts the op calls of the model, and the number of elements each one samples."""

    calls = Counter()
    sampled = []
    sample, variance = fastbnf.ops.sample, fastbnf.ops.variance

    def counted_sample(means, *args, **kwargs):
        calls["sample"] += 1
        sampled.append(sum(m.numel() for m in means))
        return sample(means, *args, **kwargs)

    def counted_variance(logvars):
        calls["variance"] += 1
        return variance(logvars)

    monkeypatch.setattr(fastbnf.ops, "sample", counted_sample)
    monkeypatch.setattr(fastbnf.ops, "variance", counted_variance)
    return calls, sampled


def test_trick_weights_are_not_sampled(backend, monkeypatch):
    torch.manual_seed(0)
    bm = fastbnf.BayesianModel(zuko.nn.MLP(5, 4, hidden_features=(8, 8)))
    calls, _ = count_ops(monkeypatch)

    with torch.profiler.profile() as prof:
        with bm.reparameterize(local_trick=True) as m:
            m(torch.randn(3, 5)).sum().backward()

    # Every selected tensor belongs to a trick layer: one variance op, no sample op.
    assert calls == {"variance": 1}
    names = Counter(e.name for e in prof.events())
    assert names["fastbnf::variance"] == 1
    assert names["fastbnf::sample"] == 0


def test_mixed_model_samples_only_the_other_parameters(backend, monkeypatch):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.Linear(8, 4))
    bm = fastbnf.BayesianModel(base)
    calls, sampled = count_ops(monkeypatch)

    with bm.reparameterize(local_trick=True, return_kl=True) as (m, kl):
        m(torch.randn(3, 5)).sum().backward()
        # The KL still covers every selected parameter.
        torch.testing.assert_close(kl, bm.kl_divergence())

    assert calls == {"sample": 1, "variance": 1}
    # Only the LayerNorm's weight and bias were drawn.
    assert sampled == [16]
    assert all(p.grad is not None for p in [*bm.means.values(), *bm.logvars.values()])


class TiedToEmbedding(nn.Module):
    r"""A Linear whose weight an embedding shares (the Linear registered first: its name is
    the key)."""

    def __init__(self):
        super().__init__()
        self.out = nn.Linear(4, 10)
        self.emb = nn.Embedding(10, 4)
        self.emb.weight = self.out.weight

    def forward(self, idx):
        return self.out(torch.tanh(self.emb(idx)))


class TiedLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize(
    "make, x",
    [
        (TiedToEmbedding, torch.tensor([1, 4, 4, 7])),
        (TiedLinears, torch.randn(5, 6)),
    ],
    ids=["linear-and-embedding", "two-linears"],
)
def test_tied_weights_get_one_treatment(backend, make, x):
    r"""Every use of a tied weight is sampled alike or takes the trick alike, with the whole
    gradient: with a posterior this narrow both ways give the mean model's gradients."""

    torch.manual_seed(0)
    base = make()
    plain = copy.deepcopy(base)
    plain(x).square().sum().backward()
    bm = fastbnf.BayesianModel(base, init_logvar=-30.0)
    key = [k for k in bm.means if k.endswith("weight")][0]
    expected = plain.get_parameter(key.replace("-", ".")).grad
    layers, skip, _ = bm._trick.plan()

    for local_trick in (False, True):
        bm.zero_grad()
        with bm.reparameterize(local_trick=local_trick) as module:
            module(x).square().sum().backward()
        error = (bm.means[key].grad - expected).abs().max()
        assert error < 0.01 * expected.abs().max(), (local_trick, error)
    if make is TiedLinears:  # both layers take the trick, the weight is not sampled
        assert set(layers) == {bm.base.a, bm.base.b} and key in skip
    else:  # the embedding needs the sample: the Linear does not take the trick
        assert key not in skip and bm.base.out not in layers
