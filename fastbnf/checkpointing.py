r"""Activation checkpointing of reparameterized models.

The implementation, and its documentation, is :mod:`fastbnf.model.checkpointing`.
"""

__all__ = ["checkpoint", "context_fn", "disarm", "install", "uninstall"]

from .model.checkpointing import checkpoint, context_fn, disarm, install, uninstall
