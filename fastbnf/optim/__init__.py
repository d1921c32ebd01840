r"""Optimizers of the posterior that train a Bayesian model with a plain model's loop.

:class:`VariationalAdam` keeps the current sample in the base model and does the Bayesian work
of a step (the KL's gradients, the reparameterization gradients, Adam on the means and
log-variances, the next sample) in :meth:`VariationalAdam.step`. :func:`variational_adam_step`
is that step for one group, composed of the ops.
"""

__all__ = ["VariationalAdam", "variational_adam_step"]

from .step import variational_adam_step
from .variational_adam import VariationalAdam
