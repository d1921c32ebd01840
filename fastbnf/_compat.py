r"""Every private PyTorch API fastbnf uses, in one place.

Each shim looks its API up once, at import, and falls back to a public (slower or weaker)
equivalent where the API is gone, so that a PyTorch release that moves one never breaks the
import. :data:`TESTED` is the range of releases the fast paths are tested on:
``tests/test_compat.py`` checks every shim against its public equivalent and fails when the
installed PyTorch is in that range but a private API is missing.
"""

__all__ = [
    "TESTED",
    "apply_function",
    "dispatch_has_kernel",
    "flatten_dense",
    "foreach_ops",
    "graph_task_id",
    "local_part",
    "profiler_enabled",
    "set_forward_pre_hook",
    "swap_parameter",
    "unflatten_dense",
]

import functools
import torch
import torch.nn as nn

from collections.abc import Callable, Sequence
from torch import Tensor
from typing import Any

#: The oldest and newest PyTorch (major, minor) whose private APIs below are tested.
TESTED = ((2, 5), (2, 14))

# The private APIs, or None where this PyTorch lacks them.
_current_graph_task_id = getattr(torch._C, "_current_graph_task_id", None)
_transforms_active = getattr(torch._C, "_are_functorch_transforms_active", None)
_profiler_enabled = getattr(torch._C._autograd, "_profiler_enabled", None)
_flatten_dense = getattr(torch._C._nn, "flatten_dense_tensors", None)
_unflatten_dense = getattr(torch._C._nn, "unflatten_dense_tensors", None)
_has_kernel = getattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", None)
# The classmethod under autograd.Function.apply, which skips its Python scan of the arguments.
_function_apply = vars(torch._C._FunctionBase).get("apply")
# The multi-tensor ops that torch.optim's foreach implementations use.
_FOREACH_OPS = ("mul_", "lerp_", "addcmul_", "sqrt", "div_", "add_", "addcdiv_")
_foreach = {name: getattr(torch, f"_foreach_{name}", None) for name in _FOREACH_OPS}

PRIVATE = {
    "torch._C._current_graph_task_id": _current_graph_task_id,
    "torch._C._are_functorch_transforms_active": _transforms_active,
    "torch._C._autograd._profiler_enabled": _profiler_enabled,
    "torch._C._nn.flatten_dense_tensors": _flatten_dense,
    "torch._C._nn.unflatten_dense_tensors": _unflatten_dense,
    "torch._C._dispatch_has_kernel_for_dispatch_key": _has_kernel,
    "torch._C._FunctionBase.apply": _function_apply,
    **{f"torch._foreach_{name}": op for name, op in _foreach.items()},
}


def graph_task_id() -> int:
    r"""The id of the autograd graph task running on this thread, -1 outside a backward (and
    always -1 where this PyTorch cannot tell)."""

    return -1 if _current_graph_task_id is None else _current_graph_task_id()


def apply_function(function: type[torch.autograd.Function], *args) -> Any:
    r"""``function.apply(*args)`` without its scan of every argument for functorch's dead
    wrappers, whose cost grows with the count of tensors: a group of a thousand tensors pays it
    on every call (``benchmarks/bench_step.py``, the ``tensors-*`` cases). For arguments that are
    never such wrappers (parameters, fastbnf's own tensors); under functorch transforms the
    usual path runs."""

    if _function_apply is None or _transforms_active is None or _transforms_active():
        return function.apply(*args)
    return _function_apply.__get__(None, function)(*args)


def foreach_ops() -> dict[str, Callable] | None:
    r"""The multi-tensor ops that :mod:`torch.optim`'s foreach implementations use, by name
    (``"mul_"`` for ``torch._foreach_mul_``), or :py:`None` where this PyTorch lacks one."""

    return None if any(op is None for op in _foreach.values()) else _foreach


def functorch_active() -> bool:
    r"""Whether a functorch transform (vmap, grad, ...) is active (where this PyTorch cannot
    tell: :py:`True`, so that the path that supports them is taken)."""

    return True if _transforms_active is None else _transforms_active()


def profiler_enabled() -> bool:
    r"""Whether a :mod:`torch.profiler` runs (where this PyTorch cannot tell: :py:`True`, so
    that profiler ranges are always entered)."""

    return True if _profiler_enabled is None else _profiler_enabled()


def flatten_dense(tensors: Sequence[Tensor]) -> Tensor:
    r"""The tensors flat and end to end, in one new tensor."""

    if _flatten_dense is None:
        return torch.cat([t.reshape(-1) for t in tensors])
    return _flatten_dense(list(tensors))


def unflatten_dense(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    r"""Views of a flat tensor shaped like a list of tensors (narrows: for tensors autograd does
    not track)."""

    if _unflatten_dense is None:
        pieces = flat.split_with_sizes([t.numel() for t in like])
        return [piece.view(t.shape) for piece, t in zip(pieces, like)]
    return _unflatten_dense(flat, list(like))


def dispatch_has_kernel(op: str, key: str) -> bool:
    r"""Whether the operator ``op`` has a kernel registered for the dispatch key ``key``."""

    if _has_kernel is None:
        namespace, name = op.split("::")
        try:
            getattr(getattr(torch.ops, namespace), name).default._schema  # noqa: B018
        except (AttributeError, RuntimeError):
            return False
        return torch._C._dispatch_has_kernel(op)
    return _has_kernel(op, key)


def set_forward_pre_hook(module: nn.Module, key: int, hook: Callable | None) -> None:
    r"""Puts ``hook`` among a module's forward pre-hooks under ``key`` (removes it for
    :py:`None`): a dict write, where ``register_forward_pre_hook`` and its handle cost host time
    per module on every step (``benchmarks/host_phases.py``). Keys of handles count up from 0:
    a negative key is free."""

    if hook is None:
        module._forward_pre_hooks.pop(key, None)
    else:
        module._forward_pre_hooks[key] = hook


def swap_parameter(module: nn.Module, name: str, value: Tensor) -> Tensor:
    r"""Puts ``value`` (any tensor, a sample say) where the parameter ``name`` of ``module`` is,
    as its forward reads it, and returns what was there. ``setattr`` would refuse a tensor that
    is not a :class:`torch.nn.Parameter`."""

    old = module._parameters[name]
    module._parameters[name] = value
    return old


@functools.cache
def _local_shape_and_offset() -> Callable | None:
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    except ImportError:
        return None
    return compute_local_shape_and_global_offset


def local_part(full: Tensor, dtensor: Tensor) -> Tensor:
    r"""This rank's part of ``full``, a whole tensor laid out as the DTensor ``dtensor`` (a
    parameter of ``fully_shard()``): a view of ``full``.

    With PyTorch's ``compute_local_shape_and_global_offset`` (private, looked up on the first
    call: ``torch.distributed.tensor`` is a heavy import that only sharded models need);
    without it, a 1-d mesh's ``Shard(dim)`` split as :func:`torch.chunk` splits, FSDP2's."""

    mesh, placements = dtensor.device_mesh, dtensor.placements
    local_shape_and_offset = _local_shape_and_offset()
    if local_shape_and_offset is not None:
        shape, offset = local_shape_and_offset(full.shape, mesh, placements)
        for dim, (size, start) in enumerate(zip(shape, offset)):
            full = full.narrow(dim, start, size)
        return full
    (placement,) = placements
    chunks = full.chunk(mesh.size(), dim=placement.dim)
    rank = mesh.get_local_rank()
    return chunks[rank] if rank < len(chunks) else full.narrow(placement.dim, 0, 0)
