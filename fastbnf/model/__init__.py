r"""The Bayesian model and its collaborators.

:class:`BayesianModel` (:mod:`fastbnf.model.bayesian_model`) is a facade: an
:class:`~torch.nn.Module` that owns ``base``, ``means`` and ``logvars`` and hands the work to
collaborators, one module each, none of which imports the facade:

- :mod:`~fastbnf.model.posterior`: the groups (tensors of one device and dtype handed to one op
  call), priors, draws, KL divergence and links;
- :mod:`~fastbnf.model.slots`: what the base model's selected slots hold (a context's samples,
  an optimizer's, the frozen weights) and the state dict hook that saves the frozen weights;
- :mod:`~fastbnf.model.local_trick`: the local reparameterization trick;
- :mod:`~fastbnf.model.sharding`: the methods under ``fully_shard()`` (FSDP2);
- :mod:`~fastbnf.model.checkpointing`: activation checkpointing of reparameterized models;
- :mod:`~fastbnf.model.selection` and :mod:`~fastbnf.model.predict`: the selection of the
  Bayesian parameters, and the posterior predictive.

:func:`~fastbnf.model.posterior.posterior_of` and :func:`~fastbnf.model.slots.slots_of` give
:mod:`fastbnf.optim` the internal interface documented in those modules.
"""

__all__ = ["BayesianModel"]

from .bayesian_model import BayesianModel
