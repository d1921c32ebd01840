r"""The methods of a Bayesian model under :func:`torch.distributed.fsdp.fully_shard` (FSDP2).

Under ``fully_shard(bm)`` the posterior is sharded outside a forward of the model. The methods
that read it then run the ops as a forward (:func:`as_forward`): FSDP gathers the parameters
before, hooks the backward of what it returns (gathered again for it, gradients
reduce-scattered after it) and, the model being the root, leaves them gathered until that
backward. Without gradients no backward follows: the method shards them again after.

:func:`gathered` decorates the methods whose outputs FSDP can hook as they are
(``kl_divergence()``, ``predict()``); :func:`gathered_draw` the draws, whose samples FSDP must
see flat (it warns of views and would hook the parameters in a group), split after the forward.
``sample_params()`` and ``reparameterize()`` shard again after their draw, or when their
context closes (:meth:`Sharding.reshards`). Tested by ``tests/test_fsdp.py``.
"""

from __future__ import annotations

__all__ = ["FORWARD", "Sharding", "as_forward", "gathered", "gathered_draw"]

import torch
import torch.nn as nn

from collections.abc import Callable
from functools import wraps
from typing import Any

from .. import ops
from .._sharding import fully_sharded, is_dtensor

# The first argument of forward() that runs one of the model's own methods as its forward, so
# that fully_shard() gathers the parameters for it (as_forward).
FORWARD = object()


class Sharding:
    r"""Creates the sharding state of a Bayesian model: whether its forward runs."""

    def __init__(self) -> None:
        # Whether forward() runs: fully_shard() has gathered the parameters then.
        self.forwarding = False

    def __getstate__(self) -> dict[str, Any]:
        return {"forwarding": False}

    def gathers(self, model: nn.Module) -> bool:
        r"""Whether the ops must run as a forward of the model: fully_shard() manages it and
        no forward runs yet."""

        return not self.forwarding and fully_sharded(model)

    def reshards(self, model: nn.Module) -> bool:
        r"""Whether a method that gathers the posterior must shard it again after: it is
        sharded now and, without gradients, no backward follows to do it."""

        if torch.is_grad_enabled():
            return False
        return is_dtensor(next(iter(model.means._parameters.values())))


def as_forward(model: nn.Module, method: Callable, *args: Any, **kwargs: Any) -> Any:
    r"""Runs ``method(*args, **kwargs)`` as a forward of the model."""

    return model(FORWARD, method, *args, **kwargs)


def gathered(method: Callable) -> Callable:
    r"""Decorates a method of a Bayesian model that reads the posterior: under fully_shard(),
    outside a forward, it runs as a forward of the model (:func:`as_forward`), and the model is
    sharded again after it when no backward follows.

    The method's outputs must be what FSDP can hook: tensors (not views), in tuples, lists or
    dicts.
    """

    @wraps(method)
    def run(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        sharding = model.__dict__["_sharding"]
        if not sharding.gathers(model):
            return method(model, *args, **kwargs)

        reshard = sharding.reshards(model)
        output = as_forward(model, method, model, *args, **kwargs)
        if reshard:
            model.reshard()
        return output

    return run


def gathered_draw(draw: Callable) -> Callable:
    r"""Decorates the draw of a Bayesian model, ``draw(model, *args, split=...)``, which returns
    each group with its sample, and a KL divergence: under fully_shard(), outside a forward, it
    runs as a forward of the model with flat samples, split after.

    It does not shard the model again: the caller does, after it or later.
    """

    @wraps(draw)
    def run(model: nn.Module, *args: Any) -> tuple[list, Any]:
        if not model.__dict__["_sharding"].gathers(model):
            return draw(model, *args, split=True)

        # The forward returns flat samples and the groups pass beside it: FSDP hooks every
        # tensor a forward returns, warns of views, and would hook the parameters in a group
        # (a dataclass).
        drawn = []

        def flat() -> tuple[list, Any]:
            samples, kl = draw(model, *args, split=False)
            drawn.extend(group for group, _ in samples)
            return [theta for _, theta in samples], kl

        thetas, kl = as_forward(model, flat)
        return [(g, ops.unflatten(theta, g.means)) for g, theta in zip(drawn, thetas)], kl

    return run
