r"""The AdamW update, as :class:`torch.optim.AdamW` computes it, over lists of tensors and over
a group's posterior (its means and log-variances with their flat moments).

:class:`fastbnf.optim.VariationalAdam` composes it with the ops where it cannot call the fused
``adam_step`` (gradients averaged over ranks between the two), and the pure-PyTorch twin of
``adam_step`` (:func:`fastbnf.reference.adam_step`) is built on it. The compiled kernels' copy of
the same maths is ``csrc/common/adam_math.h``; ``tests/test_variational_adam.py`` holds them equal.
"""

__all__ = ["adam_posterior_update", "adam_update"]

from collections.abc import Sequence
from torch import Tensor

from .. import _compat
from .._flat import views


def adam_update(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    step: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> None:
    r"""The update of :class:`torch.optim.AdamW`, operation for operation, in place, over a list
    of tensors that share a step count: with ``weight_decay=0`` that of
    :class:`torch.optim.Adam`. With PyTorch's ``_foreach`` ops each operation is one call for
    every tensor (their per-element arithmetic is the single-tensor ops': the results are
    equal); without them, a loop of the single-tensor ops."""

    beta1, beta2 = betas
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    step_size = lr / (1 - beta1**step)
    params, grads = list(params), list(grads)
    exp_avgs, exp_avg_sqs = list(exp_avgs), list(exp_avg_sqs)

    f = _compat.foreach_ops()
    if f is None:
        for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
            if weight_decay != 0:
                p.mul_(1 - lr * weight_decay)
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            p.addcdiv_(m, (v.sqrt() / bias_correction2_sqrt).add_(eps), value=-step_size)
        return

    if weight_decay != 0:
        f["mul_"](params, 1 - lr * weight_decay)
    f["lerp_"](exp_avgs, grads, 1 - beta1)
    f["mul_"](exp_avg_sqs, beta2)
    f["addcmul_"](exp_avg_sqs, grads, grads, 1 - beta2)
    denoms = f["sqrt"](exp_avg_sqs)
    f["div_"](denoms, bias_correction2_sqrt)
    f["add_"](denoms, eps)
    f["addcdiv_"](params, exp_avgs, denoms, -step_size)


def adam_posterior_update(
    means: Sequence[Tensor],
    logvars: Sequence[Tensor],
    grad_means: Tensor,
    grad_logvars: Tensor,
    exp_avgs: Tensor,
    exp_avg_sqs: Tensor,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    r"""Updates a group's means (with the decoupled weight decay) and log-variances (without)
    in place as :class:`torch.optim.AdamW` would, from their flat gradients and flat moments
    (``(2 N,)``: the means', then the log-variances')."""

    n = grad_means.numel()
    for tensors, grad, half, decay in (
        (means, grad_means, slice(0, n), weight_decay),
        (logvars, grad_logvars, slice(n, 2 * n), 0.0),
    ):
        adam_update(
            tensors,
            views(grad, tensors),
            views(exp_avgs[half], tensors),
            views(exp_avg_sqs[half], tensors),
            step,
            lr,
            (beta1, beta2),
            eps,
            decay,
        )
