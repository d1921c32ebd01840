r"""The base model's slots of the selected parameters: what they hold, and when.

A slot is a ``(module, attribute)`` of the base model where a selected parameter sits (a tied
parameter has several). It holds the frozen weight, except

- inside a ``reparameterize()`` context (:attr:`Slots.active`): the context's samples, swapped
  in and out with :func:`swap_in` and :func:`swap_out`;
- while an optimizer holds its samples there (:attr:`Slots.held`, :meth:`Slots.hold` and
  :meth:`Slots.release`, for :class:`fastbnf.optim.VariationalAdam`).

Either way the frozen weights stay what the groups, the state dict
(:func:`frozen_weights_in_state_dict`) and ``prior_mean="init"`` see.

Internal interface for :mod:`fastbnf.optim` and :mod:`fastbnf.model.checkpointing`:
:func:`slots_of`, and :attr:`Slots.active`, :attr:`Slots.held`, :meth:`Slots.hold`,
:meth:`Slots.release`, :meth:`Slots.swapped` and :attr:`Slots.modules`.
"""

from __future__ import annotations

__all__ = ["Held", "Slots", "frozen_weights_in_state_dict", "slots_of", "swap_in", "swap_out"]

import threading
import torch
import torch.nn as nn

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from torch import Tensor
from typing import Any, Protocol

from .._compat import swap_parameter
from .._sharding import is_dtensor
from .structure import Watch


class Group(Protocol):
    r"""What the slots read of a group of the posterior (:class:`fastbnf.model.posterior.Group`,
    which imports this module): its slots, each with the index of its tensor, and the names."""

    places: list[tuple[nn.Module, str, int]]
    names: list[str]


# A slot's module and attribute, what was there and the sample put there (swap_in).
Swapped = list[tuple[nn.Module, str, Tensor, Tensor]]


@dataclass
class Held:
    r"""Samples held in the base model's slots: the frozen weights they replace, the samples
    (per group, per tensor), the state dict names of each slot, and what draws the samples
    anew from the posterior (after it is loaded: a sample of the old one would be stale)."""

    originals: dict[tuple[nn.Module, str], Tensor]
    pieces: list[list[Tensor]]
    names: dict[tuple[nn.Module, str], list[str]]
    redraw: Callable[[], None] | None = None


def swap_in(samples: Sequence[tuple[Group, list[Tensor]]]) -> Swapped:
    r"""Puts samples where the base model's selected parameters are.

    Arguments:
        samples: Each group with its sample, split in views.

    Returns:
        Each slot, what was there and the sample, for :func:`swap_out`.
    """

    return [
        (module, attribute, swap_parameter(module, attribute, views[i]), views[i])
        for group, views in samples
        for module, attribute, i in group.places
    ]


def swap_out(swapped: Swapped) -> None:
    r"""Puts back what :func:`swap_in` found in the slots."""

    for module, attribute, original, sample in reversed(swapped):
        # Where fully_shard() (FSDP2) has put its own parameter since (its reshard after a
        # backward run inside reparameterize()), that one stays: FSDP knows it is there.
        if module._parameters[attribute] is sample:
            module._parameters[attribute] = original


class Slots:
    r"""Creates the record of a base model's slots of selected parameters.

    Arguments:
        base: The base model.
        places: The slots, ``(module, attribute)``, of every selected parameter.
    """

    def __init__(self, base: nn.Module, places: Sequence[tuple[nn.Module, str]]) -> None:
        self.base = base
        # The modules with slots, once each (checkpointing's sentinels go on them).
        self.modules = list({id(m): m for m, _ in places}.values())
        # Whether a reparameterize() context's samples are in the slots.
        self.active = False
        # The samples an optimizer keeps in the slots (fastbnf.optim), if any.
        self.held: Held | None = None
        # Taken by a context for its whole life (claim): two threads cannot both see the slots
        # free, and swap each other's samples in and out.
        self._claim = threading.Lock()
        # The watch on the base model's modules (structure.Watch), set by the model.
        self.watch: Watch | None = None

    def __getstate__(self) -> dict[str, Any]:
        # A copy holds the frozen weights: BayesianModel refuses to pickle held samples and
        # releases them around a deepcopy; a context's samples are swapped out of the copy.
        state = {**self.__dict__, "active": False}
        del state["_claim"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("watch", None)  # pickled before the watch
        self._claim = threading.Lock()

    def claim(self) -> bool:
        r"""Marks the slots active for a context, atomically; tells whether they were free
        (no context of this or another thread holds them)."""

        # A compiled step cannot trace a lock, and runs in one thread: the flag alone.
        if torch.compiler.is_compiling():
            if self.active:
                return False
        elif not self._claim.acquire(blocking=False):
            return False
        self.active = True
        return True

    def unclaim(self) -> None:
        r"""Ends a context's :meth:`claim`."""

        self.active = False
        if not torch.compiler.is_compiling():
            self._claim.release()

    def original(self, module: nn.Module, attribute: str) -> Tensor:
        r"""Returns the frozen weight of a slot, whatever the slot holds now."""

        if self.held is not None:
            return self.held.originals[module, attribute]
        return module._parameters[attribute]

    def hold(
        self,
        groups: Sequence[Group],
        pieces: list[list[Tensor]],
        redraw: Callable[[], None] | None = None,
    ) -> None:
        r"""Puts samples in the slots until :meth:`release`.

        Internal interface for :mod:`fastbnf.optim`.

        Arguments:
            groups: The posterior's groups.
            pieces: Their samples, per group and tensor.
            redraw: Draws new samples into ``pieces``, in place, from the posterior as it is;
                called by :meth:`fastbnf.BayesianModel.load_state_dict` after it loads one.
        """

        if self.held is not None or self.active:
            raise RuntimeError("BayesianModel: the base model's slots are in use already.")
        if self.watch is not None:
            self.watch.check()
        originals = {}
        for group, views in zip(groups, pieces, strict=True):
            for module, attribute, i in group.places:
                if (module, attribute) not in originals:
                    originals[module, attribute] = swap_parameter(module, attribute, views[i])
        names = {
            (module, attribute): [f"{name}.{attribute}" if name else attribute for name in paths]
            for (module, attribute) in originals
            for paths in [
                [n for n, m in self.base.named_modules(remove_duplicate=False) if m is module]
            ]
        }
        self.held = Held(originals, pieces, names, redraw)

    def release(self) -> None:
        r"""Puts the frozen weights back in the slots.

        Internal interface for :mod:`fastbnf.optim`.
        """

        if self.held is None:
            return
        for (module, attribute), original in self.held.originals.items():
            swap_parameter(module, attribute, original)
        self.held = None

    @contextmanager
    def swapped(self, samples: Sequence[tuple[Group, list[Tensor]]]) -> Iterator[None]:
        r"""Puts samples in the slots for the duration of a context.

        Internal interface for :mod:`fastbnf.model.checkpointing`, which reinstalls a
        context's samples for a recomputation.
        """

        swapped = swap_in(samples)
        try:
            yield
        finally:
            swap_out(swapped)

    def check_unsharded(self, samples: Sequence[tuple[Group, list[Tensor]]]) -> None:
        r"""Refuses to put samples in slots that a fully_shard() holds sharded: its forward
        would put its own parameter back where the sample goes."""

        for group, _ in samples:
            for module, attribute, i in group.places:
                if is_dtensor(module._parameters[attribute]):
                    raise RuntimeError(
                        f"BayesianModel: the base model's {group.names[i]!r} is sharded (a "
                        "DTensor of fully_shard(), FSDP2) where its sample goes; a forward of "
                        "its module would gather it over the sample. Shard the BayesianModel as "
                        "the root, fully_shard(bm), and leave the selected weights out of any "
                        "fully_shard() of the base model's modules (ignored_params)."
                    )


def slots_of(model: nn.Module) -> Slots:
    r"""Returns the slots of a :class:`~fastbnf.model.BayesianModel`.

    Internal interface for :mod:`fastbnf.optim` and :mod:`fastbnf.checkpointing`.

    Arguments:
        model: The Bayesian model.
    """

    return model.__dict__["_slots"]


def frozen_weights_in_state_dict(
    model: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    r"""A state dict post-hook of :class:`~fastbnf.model.BayesianModel`: saves the frozen
    weights under the base model's keys while samples are held in its slots, so that the state
    dict stays zuko's."""

    held = slots_of(model).held
    if held is None:
        return
    for slot, names in held.names.items():
        for name in names:
            key = f"{prefix}base.{name}"
            if key in state_dict:
                value = held.originals[slot]
                keep_vars = state_dict[key].requires_grad
                state_dict[key] = value if keep_vars else value.detach()
