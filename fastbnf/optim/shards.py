r"""The posterior of a group on this rank's shards, under ``fully_shard()`` (FSDP2).

When ``fully_shard()`` has cut every sample of a group into rows (``Shard(0)`` on a 1-d mesh,
FSDP2's default), :class:`fastbnf.optim.VariationalAdam` keeps the group's posterior in the same
rows: its means and log-variances become :class:`~torch.distributed.tensor.DTensor` parameters of
the model laid out as the samples, Adam's moments and the flat sample hold this rank's rows only,
and the step runs on them with the noise offsets of the rows (``adam_step``'s
``noise_offsets``), so that the rank draws its slice of the whole group's noise and the ranks
together take the step that one process takes. FSDP reduce-scatters (and averages) the samples'
gradients into the shards the step reads; its forward gathers the samples the step writes. The
whole posterior is never formed on a rank.
"""

from __future__ import annotations

__all__ = ["Shards", "like_dtensor", "rows_of", "shard_group", "shardable"]

import torch
import torch.nn as nn

from collections.abc import Sequence
from dataclasses import dataclass
from torch import Tensor

from .. import ops
from .._compat import local_part


@dataclass
class Shards:
    r"""A group's posterior on this rank: per tensor, the model's DTensor mean and log-variance
    parameters and their local rows (what the step updates in place), the sample's DTensor in
    the base model, the index of the rows' first element in the group's noise stream and their
    count, and the prior of the rows."""

    keys: list[str]
    mean_params: list[nn.Parameter]
    logvar_params: list[nn.Parameter]
    means: list[Tensor]
    logvars: list[Tensor]
    samples: list[Tensor]
    noise_offsets: list[int]
    counts: list[int]
    prior: ops.Prior


def shardable(shards: dict[int, Tensor], count: int) -> bool:
    r"""Whether a group's samples are all FSDP2's row shards: ``count`` of them, each a
    ``Shard(0)`` DTensor of a 1-d mesh."""

    if len(shards) != count:
        return False
    from torch.distributed.tensor import Shard

    return all(
        s.device_mesh.ndim == 1 and tuple(s.placements) == (Shard(0),) for s in shards.values()
    )


def _rows(whole: Tensor, sample: Tensor) -> Tensor:
    r"""This rank's rows of ``whole``, laid out as the DTensor ``sample``: a view."""

    rows = local_part(whole, sample)
    if rows.shape != sample.to_local().shape:
        raise RuntimeError(
            f"VariationalAdam: a shard of shape {tuple(sample.to_local().shape)} does not match "
            f"this rank's rows {tuple(rows.shape)} of its tensor of shape {tuple(whole.shape)}."
        )
    return rows


def like_dtensor(whole: Tensor, like: Tensor) -> Tensor:
    r"""This rank's part of ``whole`` as a DTensor laid out as the DTensor ``like`` (copied:
    the whole tensor can be freed after)."""

    from torch.distributed.tensor import DTensor

    local = _rows(whole, like).detach().clone(memory_format=torch.contiguous_format)
    return DTensor.from_local(
        local, like.device_mesh, like.placements, run_check=False, shape=whole.shape,
        stride=whole.stride(),
    )  # fmt: skip


def _as_parameter(whole: Tensor, like: Tensor) -> nn.Parameter:
    return nn.Parameter(like_dtensor(whole, like), requires_grad=whole.requires_grad)


def shard_group(
    keys: Sequence[str],
    means: Sequence[Tensor],
    logvars: Sequence[Tensor],
    pieces: Sequence[Tensor],
    samples: Sequence[Tensor],
    prior: ops.Prior,
) -> tuple[Shards, list[tuple[int, int]]]:
    r"""Cuts a group's posterior into this rank's rows, as ``fully_shard()`` cut its samples.

    Arguments:
        keys: The group's keys in the model's ``means`` and ``logvars``.
        means: The whole means.
        logvars: The whole log-variances.
        pieces: The whole samples, views of the group's flat sample (from offset 0).
        samples: Their DTensor shards in the base model.
        prior: The group's prior.

    Returns:
        The group's shards, and where this rank's rows of each tensor lie in the group's flat
        index space, ``(start, count)``: the rows of a flat buffer (the moments) to keep.
    """

    rows = [_rows(piece, sample) for piece, sample in zip(pieces, samples)]
    # A row range of a contiguous tensor is one flat range; the pieces start at their flat
    # offsets in the group (views of the flat sample), so the views' offsets are the rows'.
    spans = [(r.storage_offset(), r.numel()) for r in rows]
    mean_params = [_as_parameter(m, s) for m, s in zip(means, samples)]
    logvar_params = [_as_parameter(v, s) for v, s in zip(logvars, samples)]
    prior_means = None
    if prior.means is not None:
        prior_means = [_rows(m, s).clone() for m, s in zip(prior.means, samples)]
    with torch.no_grad():
        local_means = [p.to_local() for p in mean_params]
        local_logvars = [p.to_local() for p in logvar_params]
    shards = Shards(
        keys=list(keys),
        mean_params=mean_params,
        logvar_params=logvar_params,
        means=local_means,
        logvars=local_logvars,
        samples=list(samples),
        noise_offsets=[start for start, _ in spans],
        counts=[count for _, count in spans],
        prior=ops.Prior(prior.var, prior.vars, prior_means),
    )
    return shards, spans


def rows_of(flat: Tensor, spans: Sequence[tuple[int, int]], numel: int) -> Tensor:
    r"""This rank's rows of a flat buffer of a group of ``numel`` elements, or of ``(2 numel,)``
    one (the moments: the means', then the log-variances'), as a new flat tensor."""

    parts = [flat.narrow(0, start, count) for start, count in spans]
    if flat.numel() == 2 * numel:
        parts += [flat.narrow(0, numel + start, count) for start, count in spans]
    return torch.cat(parts) if parts else flat.new_empty(0)
