r"""The local reparameterization trick for linear layers.

:class:`LocalTrick` plans which layers of a Bayesian model's base model the trick takes (their
weights, and Bayesian biases, are then not sampled) and patches their forwards inside a
``reparameterize(local_trick=True)`` context; :func:`local_linear` is the patched forward.

References:
    | Variational Dropout and the Local Reparameterization Trick (Kingma et al., 2015)
    | https://arxiv.org/abs/1506.02557
"""

from __future__ import annotations

__all__ = ["LocalTrick", "is_trick_layer", "local_linear", "patched_forwards"]

import torch
import torch.nn as nn
import torch.nn.functional as F

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from torch import Tensor
from typing import Any

from .. import ops
from .posterior import Posterior

# The trick's layers with their weight and Bayesian bias keys.
Layers = dict[nn.Module, tuple[str, str | None]]


def is_trick_layer(module: nn.Module) -> bool:
    r"""Tells whether the trick applies to a module: :class:`torch.nn.Linear` and zuko's
    ``Linear`` and ``MaskedLinear``, exactly (not their subclasses), as in zuko."""

    kind = type(module)
    return kind is nn.Linear or (
        kind.__module__ == "zuko.nn" and kind.__name__ in ("Linear", "MaskedLinear")
    )


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    if weight.dim() == 2:
        return F.linear(x, weight, bias)

    # zuko's stacked Linear: one (C', C) operator per element of the stack.
    y = torch.einsum("...ij,...j->...i", weight, x)
    return y if bias is None else y + bias


def local_linear(
    x: Tensor,
    module: nn.Module,
    w_mean: Tensor,
    w_var: Tensor,
    b_mean: Tensor | None,
    b_var: Tensor | None,
    eta: Callable[[torch.Size, torch.dtype, torch.device], Tensor],
) -> Tensor:
    r"""Returns :math:`y = x \mu_W^T + \mu_b + \sqrt{x^2 \sigma_W^{2T} + \sigma_b^2} \, \eta`.

    Arguments:
        x: The input.
        module: The linear layer (its mask applies, for a masked layer).
        w_mean: The posterior mean of the weight.
        w_var: The posterior variance of the weight.
        b_mean: The posterior mean of the bias, or the layer's own bias.
        b_var: The posterior variance of the bias, or :py:`None`.
        eta: Returns the standard normal noise of an output shape, fixed within a context.
    """

    mask = getattr(module, "mask", None)

    if mask is not None:
        w_mean, w_var = mask * w_mean, mask * w_var

    y_mean = _linear(x, w_mean, b_mean)
    y_var = _linear(x.square(), w_var, b_var)

    # sqrt has an infinite slope at 0 (an all-zero input row of a layer without a Bayesian
    # bias): clamping to the smallest normal keeps the value and makes the gradient 0, not NaN.
    y_std = y_var.clamp_min(torch.finfo(y_var.dtype).tiny).sqrt()

    return y_mean + y_std * eta(y_mean.shape, y_mean.dtype, y_mean.device)


@contextmanager
def patched_forwards(forwards: dict[nn.Module, Callable[[Tensor], Tensor]]) -> Iterator[None]:
    r"""Replaces the forward of modules for the duration of a context.

    Arguments:
        forwards: The new forward of each module.
    """

    originals = {module: module.__dict__.get("forward") for module in forwards}

    for module, forward in forwards.items():
        module.forward = forward

    try:
        yield
    finally:
        for module, original in originals.items():
            if original is None:
                del module.forward
            else:
                module.forward = original


class LocalTrick:
    r"""Creates the local trick of a Bayesian model.

    Arguments:
        posterior: The model's posterior.
    """

    def __init__(self, posterior: Posterior) -> None:
        self.posterior = posterior
        # The plan, cached: building it walks every selected parameter's places.
        self.cache: tuple[Layers, frozenset[str], frozenset[str]] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "cache": None}

    def invalidate(self) -> None:
        r"""Forgets the plan."""

        self.cache = None

    def plan(self) -> tuple[Layers, frozenset[str], frozenset[str]]:
        r"""Returns the trick's layers, with their weight and Bayesian bias keys, the keys the
        trick replaces, and the other keys."""

        if self.cache is None:
            selected = self.posterior.selected

            # By places, not names: a weight tied between layers has one key, and every use
            # must see the same treatment. The trick takes a weight only where all its uses are
            # weights of trick layers (tied to an embedding, say, it is sampled as usual), and a
            # Bayesian bias only where all its uses are biases of those layers.
            def key_used_only_as(attribute, modules=None):
                found = {}
                for key, _, places in selected:
                    if all(
                        a == attribute and is_trick_layer(m) and (modules is None or m in modules)
                        for m, a in places
                    ):
                        found.update((m, key) for m, _ in places)
                return found

            weights = key_used_only_as("weight")
            biases = key_used_only_as("bias", weights)
            layers = {m: (w_key, biases.get(m)) for m, w_key in weights.items()}

            keys = frozenset(k for pair in layers.values() for k in pair if k is not None)
            self.cache = (layers, keys, frozenset(key for key, _, _ in selected) - keys)

        return self.cache

    @contextmanager
    def patched(
        self, layers: Layers, others: frozenset[str]
    ) -> Iterator[dict[nn.Module, Callable]]:
        r"""Patches the forwards of the trick's layers for the duration of a context.

        Arguments:
            layers: The trick's layers, from :meth:`plan`.
            others: The keys the trick does not replace, from :meth:`plan`.

        Yields:
            The patched forwards, by module (for activation checkpointing's reinstall).
        """

        if not layers:
            yield {}
            return

        variances = {}

        # One variance op per group of the trick's tensors.
        for group in self.posterior.groups(others):
            views = ops.unflatten(ops.variance(group.logvars), group.logvars)
            variances.update(zip(group.keys, views))

        noises: dict[tuple[nn.Module, torch.Size], Tensor] = {}

        def eta(module, shape, dtype, device):
            if (module, shape) not in noises:
                noises[module, shape] = torch.randn(shape, dtype=dtype, device=device)
            return noises[module, shape]

        forwards = {
            module: partial(
                self.forward,
                module=module,
                w_key=w_key,
                b_key=b_key,
                variances=variances,
                eta=partial(eta, module),
            )
            for module, (w_key, b_key) in layers.items()
        }

        with patched_forwards(forwards):
            yield forwards

    def forward(self, x, module, w_key, b_key, variances, eta) -> Tensor:
        r"""The patched forward of a trick layer."""

        means = self.posterior.means
        if b_key is None:
            b_mean, b_var = module.bias, None
        else:
            b_mean, b_var = means[b_key], variances[b_key]

        return local_linear(x, module, means[w_key], variances[w_key], b_mean, b_var, eta)
