r"""The prior arguments of the ops, as one value."""

__all__ = ["STANDARD_NORMAL", "Prior"]

from collections.abc import Sequence
from torch import Tensor
from typing import NamedTuple


class Prior(NamedTuple):
    r"""The prior :math:`\mathcal{N}(m_t, v_t)` of each tensor t of a group.

    A tuple in the order of the ops' schemas, so that ``*prior`` is their last three arguments.

    Arguments:
        var: The variance :math:`v_t` of every tensor, unless ``vars`` is given.
        vars: Per-tensor variances.
        means: Per-tensor means :math:`m_t`, shaped like the tensors (by default zero).
    """

    var: float = 1.0
    vars: Sequence[float] | None = None
    means: Sequence[Tensor] | None = None


#: :math:`\mathcal{N}(0, 1)` for every tensor, the ops' default prior.
STANDARD_NORMAL = Prior()
