r"""Metrics of a Bayesian classifier's predictive distribution.

Every function takes the logits of :math:`K` posterior samples stacked on a leading dim, as
:meth:`fastbnf.BayesianModel.predict` returns them: shape :math:`(K, *, C)` for :math:`C`
classes. The predictive distribution is the mean of the samples' softmaxes,
:math:`\bar{p} = \frac{1}{K} \sum_k \mathrm{softmax}(z_k)`, computed in log space.

.. code-block:: python

    with torch.no_grad():
        logits = bm.predict(x, samples=32)  # (32, N, C)

    nll(logits, y), ece(logits, y), mutual_info(logits).mean()

References:
    | Obtaining Well Calibrated Probabilities Using Bayesian Binning (Naeini et al., 2015)
    | https://ojs.aaai.org/index.php/AAAI/article/view/9602

    | Bayesian Active Learning for Classification and Preference Learning (Houlsby et al., 2011)
    | https://arxiv.org/abs/1112.5745
"""

__all__ = [
    "brier",
    "ece",
    "entropy",
    "expected_entropy",
    "mutual_info",
    "nll",
    "predictive_log_probs",
    "predictive_probs",
]

import math
import torch

from torch import Tensor


def _check_logits(logits: Tensor) -> None:
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got {logits!r:.80}.")
    if logits.dim() < 2:
        raise ValueError(
            "logits must have a leading dim of posterior samples and a last dim of classes, "
            f"(K, *, C), got shape {tuple(logits.shape)}."
        )


def _check_targets(logits: Tensor, targets: Tensor) -> None:
    _check_logits(logits)
    if not isinstance(targets, Tensor) or targets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"targets must be a tensor of class indices, got {targets!r:.80}.")
    if targets.shape != logits.shape[1:-1]:
        raise ValueError(
            f"targets must have shape {tuple(logits.shape[1:-1])} for logits of shape "
            f"{tuple(logits.shape)} (K, *, C), got {tuple(targets.shape)}."
        )
    classes = logits.shape[-1]
    if targets.numel() > 0 and not (0 <= targets.min() and targets.max() < classes):
        raise ValueError(f"targets must be class indices in [0, {classes}).")


def _reduce(values: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return values.mean()
    elif reduction == "sum":
        return values.sum()
    elif reduction == "none":
        return values
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}.")


def predictive_log_probs(logits: Tensor) -> Tensor:
    r"""Returns :math:`\log \bar{p}`, the log-probabilities of the predictive distribution.

    Arguments:
        logits: The logits of :math:`K` posterior samples, with shape :math:`(K, *, C)`.

    Returns:
        The log-probabilities, with shape :math:`(*, C)`.
    """

    _check_logits(logits)
    return _log_probs(logits)


def _log_probs(logits: Tensor) -> Tensor:
    return logits.log_softmax(dim=-1).logsumexp(dim=0) - math.log(logits.shape[0])


def predictive_probs(logits: Tensor) -> Tensor:
    r"""Returns :math:`\bar{p}`, the probabilities of the predictive distribution.

    Arguments:
        logits: The logits of :math:`K` posterior samples, with shape :math:`(K, *, C)`.

    Returns:
        The probabilities, with shape :math:`(*, C)`.
    """

    return predictive_log_probs(logits).exp()


def nll(logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    r"""Returns the negative log-likelihood of the targets under the predictive distribution,
    :math:`-\log \bar{p}_y`.

    Arguments:
        logits: The logits of :math:`K` posterior samples, with shape :math:`(K, *, C)`.
        targets: The class indices, with shape :math:`(*)`.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` over the examples.
    """

    _check_targets(logits, targets)
    log_probs = _log_probs(logits)
    return _reduce(-log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1), reduction)


def brier(logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    r"""Returns the Brier score of the predictive distribution, :math:`\sum_c (\bar{p}_c -
    [c = y])^2`.

    Arguments:
        logits: The logits of :math:`K` posterior samples, with shape :math:`(K, *, C)`.
        targets: The class indices, with shape :math:`(*)`.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` over the examples.
    """

    _check_targets(logits, targets)
    probs = _log_probs(logits).exp()
    one_hot = torch.nn.functional.one_hot(targets.long(), probs.shape[-1]).to(probs.dtype)
    return _reduce((probs - one_hot).square().sum(-1), reduction)


def ece(logits: Tensor, targets: Tensor, bins: int = 15) -> Tensor:
    r"""Returns the expected calibration error of the predictive distribution.

    The examples are binned by their confidence :math:`\max_c \bar{p}_c` into ``bins`` equal
    intervals of :math:`[0, 1]`, each right-closed; the error is :math:`\sum_b \frac{n_b}{n}
    |\mathrm{acc}_b - \mathrm{conf}_b|` over the bins, with :math:`\mathrm{acc}_b` the
    fraction of the bin's examples whose most probable class is the target.

    Arguments:
        logits: The logits of :math:`K` posterior samples, with shape :math:`(K, *, C)`.
        targets: The class indices, with shape :math:`(*)`.
        bins: The number of confidence bins.

    Returns:
        The error, a 0-dim tensor.
    """

    _check_targets(logits, targets)
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}.")

    confidence, predicted = _log_probs(logits).exp().flatten(0, -2).max(dim=-1)
    correct = (predicted == targets.flatten()).to(confidence.dtype)
    # Bin b holds the confidences in (b / bins, (b + 1) / bins], bin 0 also 0.
    which = (confidence * bins).ceil().long().clamp(1, bins) - 1
    # Per bin, the sum of (correct - confidence): its count times (accuracy - confidence).
    gap = confidence.new_zeros(bins).index_add_(0, which, correct - confidence)
    return gap.abs().sum() / max(confidence.numel(), 1)


def _entropy(log_probs: Tensor) -> Tensor:
    # 0 log 0 = 0: a class of probability 0 adds nothing (xlogy would give nan for -inf logs).
    return -(log_probs.exp() * log_probs.nan_to_num(neginf=0.0)).sum(-1)


def entropy(logits: Tensor) -> Tensor:
    r"""Returns the entropy of the predictive distribution :math:`H[\bar{p}]`, the total
    uncertainty, in nats.

    Arguments:
        logits: The logits of :math:`K` posterior samples, with shape :math:`(K, *, C)`.

    Returns:
        The entropies, with shape :math:`(*)`.
    """

    return _entropy(predictive_log_probs(logits))


def expected_entropy(logits: Tensor) -> Tensor:
    r"""Returns the mean entropy of the samples' distributions :math:`\frac{1}{K} \sum_k
    H[p_k]`, the aleatoric part of the uncertainty, in nats.

    Arguments:
        logits: The logits of :math:`K` posterior samples, with shape :math:`(K, *, C)`.

    Returns:
        The entropies, with shape :math:`(*)`.
    """

    _check_logits(logits)
    return _entropy(logits.log_softmax(dim=-1)).mean(dim=0)


def mutual_info(logits: Tensor) -> Tensor:
    r"""Returns the mutual information between the prediction and the parameters,
    :math:`H[\bar{p}] - \frac{1}{K} \sum_k H[p_k]`: the epistemic part of the uncertainty (how
    much the samples disagree), in nats. It is never negative; rounding is clamped away.

    Arguments:
        logits: The logits of :math:`K` posterior samples, with shape :math:`(K, *, C)`.

    Returns:
        The mutual informations, with shape :math:`(*)`.
    """

    return (entropy(logits) - expected_entropy(logits)).clamp_min(0.0)
