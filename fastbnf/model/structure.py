r"""A watch on the base model's structure: a module replaced after wrapping.

The model swaps samples into the slots (module, attribute) it found when it was wrapped. A
module of the base model replaced since (``bm.base[0] = nn.Linear(...)``) would not be sampled,
silently. PyTorch's global module-registration hook marks every watched module that registers a
submodule (a dict lookup per registration anywhere); the next context checks, once, that every
slot's module is still where it was, and raises if not.
"""

from __future__ import annotations

__all__ = ["Watch"]

import torch.nn as nn
import weakref

from collections.abc import Sequence

# The watches of the modules of every wrapped base model, by module.
_WATCHED: weakref.WeakKeyDictionary[nn.Module, Watch] = weakref.WeakKeyDictionary()
_HOOKED = False


def _registered(module: nn.Module, name: str, submodule: nn.Module | None) -> None:
    watch = _WATCHED.get(module)
    if watch is not None:
        watch.changed = True


def _hook() -> None:
    global _HOOKED
    # PyTorch's global hook (2.0 and later); without it, nothing is watched.
    register = getattr(nn.modules.module, "register_module_module_registration_hook", None)
    if not _HOOKED and register is not None:
        register(_registered)
        _HOOKED = True


class Watch:
    r"""Creates the watch of a base model's slots.

    Arguments:
        base: The base model.
        slots: Per selected parameter: its name in the base model and its places
            ``(module, attribute)``.
    """

    def __init__(
        self, base: nn.Module, slots: Sequence[tuple[str, Sequence[tuple[nn.Module, str]]]]
    ) -> None:
        self.base = base
        self.slots = [(name, [module for module, _ in places]) for name, places in slots]
        self.changed = False
        _hook()
        for module in base.modules():
            _WATCHED[module] = self

    def __getstate__(self) -> dict:
        return {**self.__dict__, "changed": False}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        _hook()
        for module in self.base.modules():
            _WATCHED[module] = self

    def check(self) -> None:
        r"""Raises if a slot's module is no longer in the base model, after a registration."""

        if not self.changed:
            return
        present = {id(m) for m in self.base.modules()}
        for name, modules in self.slots:
            if not all(id(m) in present for m in modules):
                raise RuntimeError(
                    f"BayesianModel: the module of the selected parameter {name!r} was "
                    "replaced in the base model after it was wrapped, so its posterior would "
                    "not be sampled there. Wrap the new base model in a new BayesianModel."
                )
        # Registrations that replaced no slot's module: watch the new modules too.
        for module in self.base.modules():
            _WATCHED[module] = self
        self.changed = False
