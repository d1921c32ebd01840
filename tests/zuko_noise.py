r"""zuko's noise under a test's control: its ``reparameterize()`` draws with
``torch.randn_like``, which :func:`zuko_draws` replaces for a block."""

import torch

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from torch import Tensor


@contextmanager
def zuko_draws(draw: Callable[[Tensor], Tensor]) -> Iterator[None]:
    r"""Makes ``torch.randn_like(t)`` return ``draw(t)`` inside the block.

    Arguments:
        draw: The noise of a tensor shaped like ``t``: the next of the noise a fastbnf sample
            was drawn with, say.
    """

    original = torch.randn_like
    torch.randn_like = lambda t, **kwargs: draw(t)
    try:
        yield
    finally:
        torch.randn_like = original
