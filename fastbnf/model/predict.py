r"""Posterior predictive outputs: the base model under K posterior samples at once."""

__all__ = ["check_positive", "predict"]

import torch.nn as nn

from collections.abc import Callable
from numbers import Integral
from torch import Tensor
from torch.func import functional_call, vmap
from torch.utils._pytree import tree_flatten
from typing import Any


def check_positive(value: Any, argument: str, optional: bool = False) -> int | None:
    r"""Returns a positive integer argument, or raises a :class:`ValueError` naming it.

    Arguments:
        value: The value to check.
        argument: Its name, for the error message.
        optional: Whether :py:`None` is accepted.
    """

    if optional and value is None:
        return None

    # numbers.Integral: NumPy's integers too; bool is an int but never a count.
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        allowed = "None or a positive integer" if optional else "a positive integer"
        raise ValueError(f"{argument} must be {allowed}, got {value!r}.")

    return int(value)


def _tensors_only(fn: Callable[..., Any]) -> Callable[..., Any]:
    r"""Wraps a function so that a non-tensor output is a clear :class:`TypeError`.

    vmap refuses such outputs too, but its message names neither the model nor the way out.
    """

    def wrapper(*args, **kwargs):
        output = fn(*args, **kwargs)
        leaves, _ = tree_flatten(output)

        for leaf in leaves:
            if not isinstance(leaf, Tensor):
                raise TypeError(
                    f"predict() stacks tensor outputs, but the base model returned a "
                    f"{type(leaf).__name__} (for example a flow's distribution). Draw the "
                    "parameters with bm.sample_params(n=K) and evaluate them in a loop, e.g. "
                    "torch.func.functional_call(bm.base, {k: v[i] for k, v in params.items()}, "
                    "args) for i in range(K)."
                )

        return output

    return wrapper


def predict(
    base: nn.Module,
    params: dict[str, Tensor],
    *args: Any,
    chunk_size: int | None = None,
    **kwargs: Any,
) -> Any:
    r"""Evaluates a base model under stacked parameter samples.

    The base model is called once per sample through :func:`torch.func.vmap` and
    :func:`torch.func.functional_call`, with the stacked parameters mapped along their first
    dim and the inputs shared. Parameters absent from ``params`` and buffers are the base
    model's own. Random operations (e.g. dropout in training mode) draw differently per sample.

    Arguments:
        base: The base model.
        params: Parameters stacked along a new first dim of size :math:`K`, keyed by name.
        args: The positional inputs of the base model.
        chunk_size: The number of samples evaluated per vmap call, by default all at once.
            Smaller chunks bound the memory of the intermediate activations.
        kwargs: The keyword inputs of the base model.

    Returns:
        The outputs of the base model, each stacked with a leading dim of size :math:`K`.
    """

    chunk_size = check_positive(chunk_size, "chunk_size", optional=True)

    def call(p: dict[str, Tensor], *a: Any, **kw: Any) -> Any:
        # tie_weights: a tied parameter sampled under its first name applies at every name.
        return functional_call(base, p, a, kw, tie_weights=True, strict=False)

    batched = vmap(
        _tensors_only(call),
        in_dims=(0, *(None,) * len(args)),
        randomness="different",
        chunk_size=chunk_size,
    )

    return batched(params, *args, **kwargs)
