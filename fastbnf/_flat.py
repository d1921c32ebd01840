r"""Flat tensors and their per-tensor views, written once.

The ops read and write a group's tensors as one flat tensor; the model, the optimizer and the
ops' backward split it back into one view per tensor. Three kinds of views:

- :func:`unflatten`: views that autograd tracks, for a flat sample the model uses;
- :func:`views`: views of untracked tensors (inside an autograd function, an optimizer's state),
  made in C++;
- :func:`flatten` and :func:`adjacent`: the way back, for the gradients of a group's views.
"""

__all__ = ["adjacent", "flatten", "unflatten", "views"]

import torch

from collections.abc import Sequence
from torch import Tensor

from . import _compat
from ._backend import extension_loaded


def unflatten(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    r"""Splits a flat tensor into views shaped like a list of tensors.

    One :func:`torch.split_with_sizes` and views, not one ``narrow`` per tensor: the backward of
    the latter adds every gradient into a full-size buffer, quadratic in the number of tensors.

    Arguments:
        flat: A flat tensor, with as many elements as the tensors together along its last dim.
        like: The tensors whose shapes to take.

    Returns:
        The views, one per tensor.
    """

    lead = flat.shape[:-1]
    pieces = flat.split_with_sizes([t.numel() for t in like], dim=-1)
    return [piece.view((*lead, *t.shape)) for piece, t in zip(pieces, like, strict=True)]


def views(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    r"""Views of a flat tensor shaped like a list of tensors, for tensors that autograd does not
    track (the views are narrows, whose backward would be quadratic in the number of tensors:
    see :func:`unflatten`).

    Made in C++: by the extension's ``fastbnf::views_like`` when it is loaded (one tensor per
    piece), else by ATen's ``unflatten_dense_tensors``. Under :func:`torch.compile`, and for a
    flat tensor with a leading dim, :func:`unflatten`'s views.

    Arguments:
        flat: A flat tensor.
        like: The tensors whose shapes to take.
    """

    if flat.dim() == 1 and len(like) > 0 and not torch.compiler.is_compiling():
        if extension_loaded():
            return torch.ops.fastbnf.views_like(flat, list(like))
        return _compat.unflatten_dense(flat, like)
    with torch.no_grad():
        return unflatten(flat, like)


def adjacent(tensors: Sequence[Tensor]) -> Tensor | None:
    r"""One flat tensor over the tensors when they are contiguous and back to back in one
    storage, in order (what the backward of a concatenation hands back), else :py:`None`. The
    extension's ``fastbnf::adjacent_flat`` when it is loaded.

    Here only the first and the last are checked for their storage: the others lie between
    them, in memory that the first one's storage holds.

    Arguments:
        tensors: A non-empty list of tensors.
    """

    if extension_loaded():
        return torch.ops.fastbnf.adjacent_flat(tensors)

    first, last = tensors[0], tensors[-1]
    storage = first.untyped_storage()
    if last.untyped_storage().data_ptr() != storage.data_ptr():
        return None
    size = first.element_size()
    start = end = first.data_ptr()
    for t in tensors:
        if t.data_ptr() != end or not t.is_contiguous():
            return None
        end += t.numel() * size
    if end > storage.data_ptr() + storage.nbytes():
        return None
    return first.as_strided(((end - start) // size,), (1,))


def flatten(tensors: Sequence[Tensor], n: int | None = None) -> Tensor:
    r"""One flat tensor from per-tensor pieces: the pieces themselves when they are
    :func:`adjacent`, else a copy.

    Arguments:
        tensors: A non-empty list of tensors.
        n: The size of the pieces' leading dim (the samples' count), which stays leading, or
            :py:`None` when they have none.
    """

    if n is None:
        flat = adjacent(tensors)
        if flat is not None:
            return flat
        return _compat.flatten_dense(tensors)
    return torch.cat([t.reshape(n, -1) for t in tensors], dim=1)
