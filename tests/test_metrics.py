r"""fastbnf.metrics against values computed by hand, and on a Bayesian classifier's predict()."""

import math
import pytest
import torch
import torch.nn as nn

import fastbnf

from fastbnf import metrics


def logits_of(probs) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log()


# Two posterior samples of one example with two classes: p1 = (0.8, 0.2), p2 = (0.4, 0.6); the
# predictive distribution is their mean, (0.6, 0.4).
TWO_SAMPLES = logits_of([[[0.8, 0.2]], [[0.4, 0.6]]])  # (K=2, N=1, C=2)
TARGET = torch.tensor([0])


def h(*p):
    return -sum(x * math.log(x) for x in p if x > 0)


def test_predictive_probs_are_the_mean_of_the_samples():
    probs = metrics.predictive_probs(TWO_SAMPLES)
    torch.testing.assert_close(probs, torch.tensor([[0.6, 0.4]], dtype=torch.float64))
    torch.testing.assert_close(metrics.predictive_log_probs(TWO_SAMPLES), probs.log())


def test_nll_and_brier_by_hand():
    torch.testing.assert_close(metrics.nll(TWO_SAMPLES, TARGET).item(), -math.log(0.6))
    # (0.6 - 1)^2 + (0.4 - 0)^2
    torch.testing.assert_close(metrics.brier(TWO_SAMPLES, TARGET).item(), 0.32)
    assert metrics.nll(TWO_SAMPLES, TARGET, reduction="none").shape == (1,)


def test_entropy_and_mutual_information_by_hand():
    total, aleatoric = h(0.6, 0.4), (h(0.8, 0.2) + h(0.4, 0.6)) / 2
    torch.testing.assert_close(metrics.entropy(TWO_SAMPLES).item(), total)
    torch.testing.assert_close(metrics.expected_entropy(TWO_SAMPLES).item(), aleatoric)
    torch.testing.assert_close(metrics.mutual_info(TWO_SAMPLES).item(), total - aleatoric)


def test_samples_that_agree_have_no_mutual_information_and_zero_probabilities_no_nan():
    same = logits_of([[[1.0, 0.0, 0.0]], [[1.0, 0.0, 0.0]]])  # log 0 = -inf
    assert metrics.mutual_info(same).item() == 0.0
    assert metrics.entropy(same).item() == 0.0
    assert metrics.nll(same, torch.tensor([0])).item() == 0.0


def test_ece_by_hand():
    # One sample (K=1), four examples of three classes, two bins: (0, 0.5] and (0.5, 1].
    probs = [[0.9, 0.05, 0.05], [0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.4, 0.35, 0.25]]
    targets = torch.tensor([0, 1, 0, 0])  # the second example's prediction is wrong
    upper = 3 / 4 * abs(2 / 3 - (0.9 + 0.7 + 0.6) / 3)  # three examples, two right
    lower = 1 / 4 * abs(1 - 0.4)  # one example, right
    got = metrics.ece(logits_of([probs]), targets, bins=2)
    torch.testing.assert_close(got.item(), upper + lower)
    # A confidence on a bin's edge belongs to the lower bin: 0.5 is in (0, 0.5].
    edge = metrics.ece(logits_of([[[0.5, 0.5]]]), torch.tensor([0]), bins=2)
    torch.testing.assert_close(edge.item(), 0.5)


def test_metrics_of_a_bayesian_classifier():
    torch.manual_seed(0)
    bm = fastbnf.BayesianModel(nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)))
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    with torch.no_grad():
        logits = bm.predict(x, samples=8)
    assert logits.shape == (8, 10, 3)
    torch.testing.assert_close(metrics.predictive_probs(logits).sum(-1), torch.ones(10))
    for value in (metrics.nll(logits, y), metrics.brier(logits, y), metrics.ece(logits, y)):
        assert value.shape == () and torch.isfinite(value)
    info = metrics.mutual_info(logits)
    assert info.shape == (10,) and (info >= 0).all()
    assert (metrics.entropy(logits) >= info).all()


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match=r"logits must have a leading dim .* got shape \(3,\)"):
        metrics.entropy(torch.zeros(3))
    with pytest.raises(ValueError, match="logits must be a floating-point tensor"):
        metrics.entropy(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"targets must have shape \(1,\)"):
        metrics.nll(TWO_SAMPLES, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"targets must be class indices in \[0, 2\)"):
        metrics.brier(TWO_SAMPLES, torch.tensor([2]))
    with pytest.raises(ValueError, match="targets must be a tensor of class indices"):
        metrics.nll(TWO_SAMPLES, torch.tensor([0.0]))
    with pytest.raises(ValueError, match="reduction must be"):
        metrics.nll(TWO_SAMPLES, TARGET, reduction="avg")
    with pytest.raises(ValueError, match="bins must be a positive integer"):
        metrics.ece(TWO_SAMPLES, TARGET, bins=0)
