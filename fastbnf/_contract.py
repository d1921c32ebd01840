r"""The input contract of the ops, for the pure-PyTorch backend.

The twin of ``csrc/group.cpp``, which checks the same contract for the compiled kernels: the
same checks in the same order, the same error types and messages (``tests/test_contract.py``
runs one table of bad inputs against every backend).

The dtype contract:

* posterior (means, log-variances, prior means): float16, bfloat16, float32 or float64. The
  group's dtype is that of its first tensor; a tensor of another floating dtype is converted to
  it, so is a non-contiguous one (made contiguous).
* arithmetic: float32 for float16, bfloat16 and float32 groups, float64 for float64 ones.
* samples: the group's dtype, float16, bfloat16 or float32 (the last for a 16-bit posterior of
  a float32 model).
* gradients of the samples: any floating dtype; results are in the group's dtype.
"""

__all__ = [
    "Group",
    "check_adam_step",
    "check_grad_kl",
    "check_grad_theta",
    "check_out_dtype",
    "check_rng_state",
    "check_samples",
    "check_step_tensor",
    "compute_dtype",
    "make_group",
]

import math
import torch

from collections.abc import Sequence
from dataclasses import dataclass
from torch import Tensor

POSTERIOR_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FLOATING = "a floating dtype (float16, bfloat16, float32 or float64)"


def _shape(x: Tensor) -> str:
    return str(tuple(x.shape))


def _number(value: float) -> str:
    return "nan" if math.isnan(value) else format(value, "g")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    r"""The dtype of the arithmetic on a group of a dtype."""

    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class Group:
    r"""A validated group: its tensors in the group's dtype and contiguous."""

    dtype: torch.dtype
    device: torch.device
    means: list[Tensor] | None
    logvars: list[Tensor]
    prior_means: list[Tensor] | None
    numel: int
    # Per tensor, the index of its first element in the noise stream: its offset in the group,
    # or the op's noise_offsets (a shard's place in the whole group).
    noise_begins: list[int] | None = None


def _check_prior_var(op: str, what: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{op}: {what} must be positive and finite, got {_number(value)}")


def _readable(op: str, name: str, x: Tensor, first: str, t: int, shape, group: Group) -> Tensor:
    if x.device != group.device:
        raise ValueError(
            f"{op}: {name}[{t}] is on {x.device}, expected {group.device} like {first}[0]"
        )
    if x.dtype not in POSTERIOR_DTYPES:
        raise TypeError(f"{op}: {name}[{t}] has dtype {x.dtype}, expected {_FLOATING}")
    if x.shape != shape:
        raise ValueError(
            f"{op}: {name}[{t}] has shape {_shape(x)}, expected {tuple(shape)} like {first}[{t}]"
        )
    return x.to(group.dtype).contiguous()


def make_group(
    op: str,
    means: Sequence[Tensor] | None,
    logvars: Sequence[Tensor],
    prior: tuple[float, Sequence[float] | None, Sequence[Tensor] | None] | None = None,
    noise_offsets: Sequence[int] | None = None,
) -> Group:
    r"""Checks a group and returns it in its dtype, contiguous.

    Arguments:
        op: The public op's name, such as ``"fastbnf::sample"``.
        means: The means, or :py:`None` for the ops that read none.
        logvars: The log-variances.
        prior: ``(prior_var, prior_vars, prior_means)``, or :py:`None` for the ops that use no
            prior.
        noise_offsets: Per tensor, the index of its first element in the noise stream
            (``adam_step``'s shards), by default its offset in the group.
    """

    count = len(logvars)
    if means is not None and len(means) != count:
        raise ValueError(f"{op}: means has {len(means)} tensors but logvars has {count}")
    if count == 0:
        raise ValueError(f"{op}: the group holds no tensors")
    first_list = "means" if means is not None else "logvars"
    first = means[0] if means is not None else logvars[0]
    if first.dtype not in POSTERIOR_DTYPES:
        raise TypeError(f"{op}: {first_list}[0] has dtype {first.dtype}, expected {_FLOATING}")

    group = Group(first.dtype, first.device, None, [], None, 0)

    prior_means = None
    if prior is not None:
        prior_var, prior_vars, prior_means = prior
        _check_prior_var(op, "prior_var", prior_var)
        if prior_vars is not None:
            if len(prior_vars) != count:
                raise ValueError(
                    f"{op}: prior_vars has {len(prior_vars)} entries for {count} tensors"
                )
            for t, value in enumerate(prior_vars):
                _check_prior_var(op, f"prior_vars[{t}]", value)
        if prior_means is not None and len(prior_means) != count:
            raise ValueError(
                f"{op}: prior_means has {len(prior_means)} entries for {count} tensors"
            )

    if noise_offsets is not None:
        if len(noise_offsets) != count:
            raise ValueError(
                f"{op}: noise_offsets has {len(noise_offsets)} entries for {count} tensors"
            )
        for t, value in enumerate(noise_offsets):
            if value < 0:
                raise ValueError(f"{op}: noise_offsets[{t}] must be >= 0, got {value}")

    checked_means, checked_priors, begins = [], [], []
    for t in range(count):
        shape = (means if means is not None else logvars)[t].shape
        if means is not None:
            checked_means.append(_readable(op, "means", means[t], first_list, t, shape, group))
        group.logvars.append(_readable(op, "logvars", logvars[t], first_list, t, shape, group))
        if prior_means is not None:
            checked_priors.append(
                _readable(op, "prior_means", prior_means[t], first_list, t, shape, group)
            )
        begins.append(group.numel)
        group.numel += group.logvars[-1].numel()

    group.noise_begins = begins if noise_offsets is None else list(noise_offsets)
    group.means = checked_means if means is not None else None
    group.prior_means = checked_priors if prior_means is not None else None
    return group


def check_samples(op: str, n: int | None) -> int:
    r"""Returns the number of samples, ``n`` or 1."""

    if n is not None and n < 0:
        raise ValueError(f"{op}: n must be non-negative, got {n}")
    return 1 if n is None else n


def check_out_dtype(op: str, out_dtype: torch.dtype | None, group: Group) -> torch.dtype:
    r"""Returns the dtype of the samples."""

    dtype = group.dtype if out_dtype is None else out_dtype
    if not is_sample_dtype(dtype, group):
        raise TypeError(
            f"{op}: out_dtype must be torch.float16, torch.bfloat16, torch.float32 or the "
            f"group's dtype ({group.dtype}), got {dtype}"
        )
    return dtype


def is_sample_dtype(dtype: torch.dtype, group: Group) -> bool:
    r"""Whether samples are stored, and their gradients read, in a dtype as it is: the group's,
    float16, bfloat16 or float32."""

    return dtype in (group.dtype, torch.float16, torch.bfloat16, torch.float32)


def check_grad_theta(op: str, grad_theta: Tensor, group: Group) -> Tensor:
    r"""Returns the gradient of the samples in the arithmetic's dtype."""

    if grad_theta.device != group.device:
        raise ValueError(f"{op}: grad_theta is on {grad_theta.device}, expected {group.device}")
    if grad_theta.dtype not in POSTERIOR_DTYPES:
        raise TypeError(f"{op}: grad_theta has dtype {grad_theta.dtype}, expected {_FLOATING}")
    n = group.numel
    if not (
        (grad_theta.dim() == 1 and grad_theta.shape[0] == n)
        or (grad_theta.dim() == 2 and grad_theta.shape[1] == n)
    ):
        raise ValueError(
            f"{op}: grad_theta has shape {_shape(grad_theta)}, expected ({n},) or (n, {n})"
        )
    return grad_theta.to(compute_dtype(group.dtype))


def check_grad_kl(op: str, grad_kl: Tensor, group: Group) -> None:
    r"""Checks the KL's incoming gradient: one element on the group's device."""

    if grad_kl.numel() != 1 or grad_kl.device != group.device:
        raise ValueError(
            f"{op}: grad_kl must hold one element on {group.device}, got shape "
            f"{_shape(grad_kl)} on {grad_kl.device}"
        )


def check_step_tensor(op: str, step_tensor: Tensor, group: Group) -> None:
    r"""Checks ``step_tensor``: the count of a capturable step, one int64 element on the
    group's device (its value is not checked: that would read the device)."""

    if not (
        step_tensor.dtype == torch.int64
        and step_tensor.numel() == 1
        and step_tensor.device == group.device
    ):
        raise ValueError(
            f"{op}: step_tensor must be an int64 tensor of one element on {group.device}, "
            f"got {step_tensor.dtype} of shape {_shape(step_tensor)} on {step_tensor.device}"
        )


def check_rng_state(op: str, rng_state: Tensor, group: Group) -> None:
    r"""Checks ``rng_state``: an int64 ``(seed, offset)`` pair on the group's device."""

    if not (
        rng_state.dtype == torch.int64
        and rng_state.dim() == 1
        and rng_state.shape[0] == 2
        and rng_state.device == group.device
    ):
        raise ValueError(
            f"{op}: rng_state must be an int64 tensor of shape (2,) on {group.device}, got "
            f"{rng_state.dtype} of shape {_shape(rng_state)} on {rng_state.device}"
        )


def _check_state(
    op: str, name: str, x: Tensor, group: Group, numel: int, ok: bool, wanted: str
) -> None:
    if not (
        ok
        and x.device == group.device
        and x.dim() == 1
        and x.shape[0] == numel
        and x.is_contiguous()
    ):
        raise ValueError(
            f"{op}: {name} must be a contiguous tensor of shape ({numel},) on {group.device} of "
            f"{wanted}, got {x.dtype} of shape {_shape(x)} on {x.device}, contiguous: "
            f"{x.is_contiguous()}"
        )


def check_adam_step(
    op: str,
    group: Group,
    means: Sequence[Tensor],
    logvars: Sequence[Tensor],
    grad_theta: Tensor,
    exp_avgs: Tensor,
    exp_avg_sqs: Tensor,
    theta: Tensor,
    step: int,
) -> Tensor:
    r"""Checks the state that a fused Adam step updates in place and returns ``grad_theta`` in
    ``theta``'s dtype: the means and log-variances contiguous and of the group's dtype (the
    caller's tensors are updated, not copies), ``exp_avgs`` and ``exp_avg_sqs`` of shape
    ``(2 N,)`` and the group's dtype, ``theta`` of shape ``(N,)`` and a sample dtype,
    ``grad_theta`` of shape ``(N,)``, ``step >= 1``."""

    for name, tensors in (("means", means), ("logvars", logvars)):
        for t, x in enumerate(tensors):
            if x.dtype != group.dtype or not x.is_contiguous():
                raise ValueError(
                    f"{op}: {name}[{t}] is updated in place and must be contiguous, of the "
                    f"group's dtype {group.dtype}, got {x.dtype}, contiguous: "
                    f"{x.is_contiguous()}"
                )
    n = group.numel
    wanted = f"the group's dtype {group.dtype}"
    _check_state(op, "exp_avgs", exp_avgs, group, 2 * n, exp_avgs.dtype == group.dtype, wanted)
    _check_state(
        op, "exp_avg_sqs", exp_avg_sqs, group, 2 * n, exp_avg_sqs.dtype == group.dtype, wanted
    )
    _check_state(
        op,
        "theta",
        theta,
        group,
        n,
        is_sample_dtype(theta.dtype, group),
        "the group's dtype, torch.float16, torch.bfloat16 or torch.float32",
    )
    if not (
        grad_theta.dtype in POSTERIOR_DTYPES
        and grad_theta.device == group.device
        and grad_theta.dim() == 1
        and grad_theta.shape[0] == n
    ):
        raise ValueError(
            f"{op}: grad_theta must be a tensor of shape ({n},) on {group.device} of {_FLOATING}, "
            f"got {grad_theta.dtype} of shape {_shape(grad_theta)} on {grad_theta.device}"
        )
    if step < 1:
        raise ValueError(f"{op}: step must be >= 1, got {step}")
    return grad_theta.to(theta.dtype).contiguous()
