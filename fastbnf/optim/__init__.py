r"""Optimizers of the posterior (work in progress: the fused variational Adam step).

:func:`variational_adam_step` is the step of a group on its own: given the gradient of the loss
with respect to the current sample, it is the seed's loop (KL, sample, backward, Adam on the
means and log-variances) reordered, and it draws the next sample. It runs on every backend
through the ops, and is the oracle of the fused kernels to come.
"""

__all__ = ["variational_adam_step"]

from .step import variational_adam_step
