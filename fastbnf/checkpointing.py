r"""Activation checkpointing of reparameterized models.

The implementation, and its documentation, is :mod:`fastbnf.model.checkpointing`.
"""

__all__ = ["checkpoint", "context_fn", "disarm", "install", "uninstall"]

from .model.checkpointing import checkpoint, context_fn, disarm, install, uninstall

# What models pickled before fastbnf.model existed hold in their base modules' hooks (a
# sentinel pickles as one) under this module's name.
from .model.checkpointing import _Disarmed  # noqa: F401
