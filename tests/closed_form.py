r"""The float64 closed forms of the kernels' maths and noise, for the kernel tests.

The formulas of ``docs/kernels.md`` in float64, and the noise from the NumPy Philox twin: an
oracle independent of both the kernels and :mod:`fastbnf.reference`.
"""

import numpy as np
import torch
from philox_twin import numpy_normals as _normals


def f64(tensors):
    return torch.cat([t.reshape(-1) for t in tensors]).double().cpu()


def softclip64(x):
    return x / torch.sqrt(1 + (x / 18.0) ** 2)


def expected_eps(rng_state, n_samples, numel):
    r"""eps of every flat sample index, float64, from the NumPy twin: (n_samples, numel)."""

    salted_seed, offset = rng_state.cpu().tolist()
    j = np.arange(n_samples * numel, dtype=np.uint64)
    return torch.from_numpy(_normals(salted_seed, offset, j)).reshape(n_samples, numel)


class Formulas:
    r"""The float64 formulas of docs/kernels.md for one group and prior."""

    def __init__(self, means, logvars, prior_var=1.0, prior_vars=None, prior_means=None):
        self.mu = f64(means)
        self.x = f64(logvars)
        self.lc = softclip64(self.x)
        self.slope = (1 + (self.x / 18.0) ** 2) ** -1.5
        self.sigma = (self.lc / 2).exp()
        sizes = torch.tensor([m.numel() for m in means])
        self.pv = (
            torch.full_like(self.mu, prior_var)
            if prior_vars is None
            else torch.tensor(prior_vars, dtype=torch.float64).repeat_interleave(sizes)
        )
        self.m = torch.zeros_like(self.mu) if prior_means is None else f64(prior_means)

    def theta(self, eps):
        return self.mu + self.sigma * eps

    def kl(self):
        d = self.mu - self.m
        terms = 0.5 * (self.lc.exp() / self.pv + d * d / self.pv + self.pv.log() - self.lc - 1)
        return terms.sum()

    def grads(self, g, eps, gk=None):
        r"""g, eps: (n, N) float64; gk: the KL's incoming gradient or None."""

        grad_mu = g.sum(0)
        grad_lv = self.slope * 0.5 * self.sigma * (g * eps).sum(0)
        if gk is not None:
            grad_mu = grad_mu + gk * (self.mu - self.m) / self.pv
            grad_lv = grad_lv + self.slope * gk * 0.5 * (self.lc.exp() / self.pv - 1)
        return grad_mu, grad_lv

    def scales(self, g=None, eps=None, gk=None):
        r"""The magnitudes of the terms of grad_mu and grad_logvar, ``|G| + |gk d / v|`` and
        ``slope (|sigma E / 2| + |gk| (var / v + 1) / 2)``: the scale of their rounding errors.
        g, eps: the samples' gradients and noise (any shape ending in N) or None; gk: the KL's
        incoming gradient or None."""

        scale_mu, part = torch.zeros_like(self.mu), torch.zeros_like(self.mu)
        if g is not None:
            g64 = g.double().cpu().reshape(-1, self.mu.numel())
            e64 = eps.double().cpu().reshape(-1, self.mu.numel())
            scale_mu += g64.abs().sum(0)
            part += self.sigma / 2 * (g64 * e64).abs().sum(0)
        if gk is not None:
            gk = abs(float(gk))
            scale_mu += gk * ((self.mu - self.m) / self.pv).abs()
            part += gk * (self.lc.exp() / self.pv + 1) / 2
        return scale_mu, self.slope * part
