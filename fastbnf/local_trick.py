r"""The local reparameterization trick for linear layers.

References:
    | Variational Dropout and the Local Reparameterization Trick (Kingma et al., 2015)
    | https://arxiv.org/abs/1506.02557
"""

__all__ = ["is_trick_layer", "local_linear", "patched_forwards"]

import torch
import torch.nn as nn
import torch.nn.functional as F

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from torch import Tensor


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
