r"""The link between a group's KL and its next sample (the seed-style step)."""

from collections.abc import Sequence
from operator import is_
from torch import Tensor


class Link:
    r"""Ties a group's KL divergence to the next sample of the same group, the seed-style
    ``kl_divergence()`` then ``reparameterize()``, so that one kernel call computes the
    gradients of both, as with ``return_kl``.

    The sample takes :attr:`token`, an output of the KL's node, as its only input: autograd then
    runs the sample's backward first. It leaves its flat gradient in :attr:`stash`; the KL's
    backward hands both gradients to one ``sample_backward`` call. Each parameter then receives
    one gradient, from one node.
    """

    __slots__ = ("tensors", "token", "stash", "taken", "native")

    def __init__(self) -> None:
        self.tensors: tuple[Tensor, ...] = ()
        self.token: Tensor | None = None
        self.stash: tuple | None = None
        self.taken = False
        # Whether the token comes from the C++ nodes (fastbnf.ops.native), whose KL's node
        # holds the stash itself.
        self.native = False

    def take(self, means: Sequence[Tensor], logvars: Sequence[Tensor]) -> tuple[Tensor, ...]:
        r"""Checks that a sample of these tensors may take the link, marks it taken, and
        returns the tensors, means then log-variances."""

        tensors = (*means, *logvars)
        if self.token is None or self.taken:
            raise ValueError("a Link is taken by one sample, after a kl(link=...) call")
        # Identity, compared in C (map over operator.is_): this runs every step.
        if len(tensors) != len(self.tensors) or not all(map(is_, tensors, self.tensors)):
            raise ValueError("the Link comes from a KL of other tensors than this sample's")
        self.taken = True
        return tensors
