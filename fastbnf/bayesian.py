r"""Bayesian models, a drop-in replacement for ``zuko.bayesian``.

The model lives in :mod:`fastbnf.model`; this module keeps zuko's import path,
``from fastbnf.bayesian import BayesianModel``.
"""

__all__ = ["BayesianModel"]

from .model import BayesianModel
from .model.slots import frozen_weights_in_state_dict as _base_weights_in_state_dict  # noqa: F401

# _base_weights_in_state_dict: the state dict hook by the name that models pickled before
# fastbnf.model existed refer to (BayesianModel.__setstate__ reads their other attributes).
