r"""Activation checkpointing of reparameterized models.

:func:`torch.utils.checkpoint.checkpoint` runs the forward of a region again during backward.
Inside :meth:`BayesianModel.reparameterize` the base model holds sampled weights; once the context
has closed it holds the base weights again, so a recomputation that runs after the context (a
``bm(fn, ...)`` forward under :class:`~torch.nn.parallel.DistributedDataParallel`, whose backward
runs outside) would see the wrong weights and silently give wrong gradients.

Two things fix that. :func:`checkpoint` (or ``context_fn=fastbnf.checkpointing.context_fn``
given to :func:`torch.utils.checkpoint.checkpoint` with ``use_reentrant=False``) keeps the
reparameterization of the checkpointed region alive, the sampled views and the local trick's
forwards, and reinstalls it around the recomputation, so the recomputed forward sees exactly the
samples of the original one. And when a context closes with autograd on, a sentinel forward
pre-hook goes on the base modules that hold selected parameters: a forward of such a module that
runs during a backward pass while no reparameterization is in place (a plain checkpoint
recomputing after the context closed) raises a clear error instead of using the base weights.
The sentinels come off when the model is reparameterized again, or with :func:`disarm` (to
checkpoint the bare base model between contexts).

The model calls :func:`install` and :func:`uninstall` around each context with its slots
(:class:`~fastbnf.model.slots.Slots`), the record this module keeps and reads: it does not
import the model. The public names are re-exported by :mod:`fastbnf.checkpointing`.
"""

from __future__ import annotations

__all__ = ["checkpoint", "context_fn", "disarm", "install", "strip", "uninstall"]

import torch
import torch.nn as nn
import torch.utils.checkpoint
import weakref

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from functools import partial
from typing import Any

from .. import _compat
from .local_trick import patched_forwards
from .slots import Slots, slots_of


class _State:
    r"""A reparameterization in place: the model's slots, its sampled views and its patched
    forwards."""

    __slots__ = ("slots", "samples", "forwards")

    def __init__(self, slots: Slots, samples: list, forwards: dict) -> None:
        self.slots = slots
        self.samples = samples
        self.forwards = forwards


# By the models' slots: the reparameterizations in place, the count of reinstalls of each, and
# the slots whose modules carry sentinels.
_ACTIVE: list[_State] = []
_REINSTALLED: weakref.WeakKeyDictionary[Slots, int] = weakref.WeakKeyDictionary()
_ARMED: weakref.WeakSet[Slots] = weakref.WeakSet()

_MESSAGE = (
    "fastbnf: a module of a BayesianModel's base model ran during backward after its "
    "reparameterize() context had closed. This is activation checkpointing recomputing the "
    "forward, and it would see the base weights instead of the sampled ones (silently wrong "
    "gradients). Either call backward() inside the context, or checkpoint with "
    "fastbnf.checkpointing.checkpoint(fn, *args) (or torch.utils.checkpoint.checkpoint(fn, "
    "*args, use_reentrant=False, context_fn=fastbnf.checkpointing.context_fn)), which "
    "reinstalls the samples for the recomputation. (To checkpoint the bare base model "
    "between contexts, call fastbnf.checkpointing.disarm(bm) first.)"
)


class _Disarmed:
    r"""What a sentinel becomes in a copy or a pickle of the base model: nothing."""

    def __call__(self, module: nn.Module, args: tuple) -> None:
        return None


class _Sentinel:
    r"""A forward pre-hook that refuses a recomputation seeing the base weights."""

    def __init__(self, slots: Slots) -> None:
        self.slots = weakref.ref(slots)

    def __call__(self, module: nn.Module, args: tuple) -> None:
        # Outside a backward, in compiled code (whose recomputations come from its graph,
        # never from the module), or without gradients (a recomputation builds a graph; a
        # forward under no_grad in some autograd function's backward is not one), no
        # recomputation can see the base weights.
        if (
            torch.compiler.is_compiling()
            or _compat.graph_task_id() == -1
            or not torch.is_grad_enabled()
        ):
            return None

        slots = self.slots()

        if slots is None or slots.active or _REINSTALLED.get(slots, 0) > 0:
            return None

        raise RuntimeError(_MESSAGE)

    # A sampled copy (sample_model) or a saved model must not carry a link to this model.
    def __deepcopy__(self, memo: dict) -> _Disarmed:
        return _Disarmed()

    def __reduce__(self) -> tuple:
        return (_Disarmed, ())


# The sentinel is a forward pre-hook stored under a key of its own (_compat.set_forward_pre_hook),
# not through register_forward_pre_hook: arming and disarming run on every step.
_KEY = -0x0FA57B4F


def _arm(slots: Slots) -> None:
    if slots in _ARMED:
        return

    sentinel = _Sentinel(slots)

    for module in slots.modules:
        _compat.set_forward_pre_hook(module, _KEY, sentinel)

    _ARMED.add(slots)


def strip(module: nn.Module) -> None:
    r"""Takes every sentinel off a module and its submodules, for good: a copy of the base model
    (:meth:`~fastbnf.model.BayesianModel.sample_model`) is a plain model, with no hook of
    fastbnf's.

    Arguments:
        module: A module.
    """

    for m in module.modules():
        _compat.set_forward_pre_hook(m, _KEY, None)


def disarm(model: nn.Module) -> None:
    r"""Takes the sentinels of a model off until its next context closes.

    Between contexts the sentinels cannot tell the recomputation of a closed context from that
    of a checkpoint of the bare base model; call this before checkpointing the latter.

    Arguments:
        model: The :class:`~fastbnf.model.BayesianModel`.
    """

    _disarm(slots_of(model))


def _disarm(slots: Slots) -> None:
    if slots not in _ARMED:
        return

    for module in slots.modules:
        _compat.set_forward_pre_hook(module, _KEY, None)

    _ARMED.discard(slots)


def install(slots: Slots, samples: list, forwards: dict) -> _State | None:
    r"""Records a reparameterization until :func:`uninstall`: checkpoints taken meanwhile
    capture it. (Two calls rather than a context manager: this runs every step.)

    Arguments:
        slots: The Bayesian model's slots.
        samples: Its ``(group, views)`` pairs as swapped into the base model.
        forwards: The local trick's patched forwards, by module.

    Returns:
        The record, for :func:`uninstall`.
    """

    if torch.compiler.is_compiling():
        # A compiled step: its graph holds the samples, and torch.compile recomputes
        # checkpointed regions from the graph, so there is nothing to reinstall. (Dynamo cannot
        # trace the bookkeeping below either: it writes to modules' hook dicts.)
        return None

    _disarm(slots)
    state = _State(slots, samples, forwards)
    _ACTIVE.append(state)
    return state


def uninstall(slots: Slots, state: _State | None) -> None:
    r"""Ends the record of :func:`install`; with autograd on, arms the model's sentinels."""

    if state is None:
        return

    _ACTIVE.remove(state)

    if torch.is_grad_enabled():
        _arm(slots)


def _release(slots: Slots) -> None:
    _REINSTALLED[slots] -= 1


@contextmanager
def _reinstall(states: tuple[_State, ...]) -> Iterator[None]:
    with ExitStack() as stack:
        for state in states:
            stack.enter_context(state.slots.swapped(state.samples))
            stack.enter_context(patched_forwards(state.forwards))
            _REINSTALLED[state.slots] = _REINSTALLED.get(state.slots, 0) + 1
            stack.callback(_release, state.slots)

        yield


def _noop_context_fn() -> tuple[AbstractContextManager, AbstractContextManager]:
    return nullcontext(), nullcontext()


def context_fn(
    inner: Callable[[], tuple[AbstractContextManager, AbstractContextManager]] = _noop_context_fn,
) -> tuple[AbstractContextManager, AbstractContextManager]:
    r"""Returns the forward and recompute contexts of a checkpoint of reparameterized models.

    Pass it as ``context_fn`` to :func:`torch.utils.checkpoint.checkpoint` (with
    ``use_reentrant=False``). It captures the reparameterizations in place when the checkpointed
    forward runs and reinstalls them around the recomputation, so that the recomputed forward
    sees the same sampled weights (and local trick noise) even after the contexts closed. The
    captured samples stay alive until the checkpoint's graph is freed.

    Arguments:
        inner: Another ``context_fn`` to compose with, e.g. selective checkpointing's.

    Returns:
        The forward context and the recompute context.
    """

    states = tuple(_ACTIVE)
    forward, recompute = inner()

    @contextmanager
    def recompute_context() -> Iterator[None]:
        with _reinstall(states), recompute:
            yield

    return forward, recompute_context()


def checkpoint(
    function: Callable[..., Any],
    *args: Any,
    use_reentrant: bool | None = None,
    context_fn: Callable[[], tuple] | None = None,
    **kwargs: Any,
) -> Any:
    r"""Checkpoints a function of reparameterized models.

    The same as :func:`torch.utils.checkpoint.checkpoint` with ``use_reentrant=False``, except
    that the recomputation sees the samples of the original forward even when backward runs
    after the :meth:`BayesianModel.reparameterize` context closed (as with ``bm(fn, ...)``).

    Arguments:
        function: The function to checkpoint.
        args: Its positional arguments.
        use_reentrant: Must be :py:`None` or :py:`False`: the reentrant variant has no
            recompute context.
        context_fn: Another ``context_fn`` to compose with.
        kwargs: Its keyword arguments, and those of :func:`torch.utils.checkpoint.checkpoint`
            (``preserve_rng_state``, ``determinism_check``, ...).

    Returns:
        What ``function`` returns.
    """

    if use_reentrant:
        raise ValueError(
            "fastbnf.checkpointing.checkpoint: use_reentrant=True has no recompute context to "
            "reinstall the samples in; use use_reentrant=False (the default here)."
        )

    outer = _context_fn if context_fn is None else partial(_context_fn, inner=context_fn)

    return torch.utils.checkpoint.checkpoint(
        function, *args, use_reentrant=False, context_fn=outer, **kwargs
    )


_context_fn = context_fn
