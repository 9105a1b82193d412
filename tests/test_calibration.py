"""Accuracy, NLL, Brier, ECE and temperature scaling against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ivonserve import calibration as cal


def test_per_question_values_by_hand():
    probs = [[0.7, 0.2, 0.1], [0.4, 0.6], [0.25, 0.25, 0.25, 0.25]]
    values = cal.per_question(probs, [0, 0, 3])
    assert values.correct.tolist() == [1.0, 0.0, 0.0]  # a tie goes to the first: wrong here
    assert values.nll == pytest.approx([-math.log(0.7), -math.log(0.4), -math.log(0.25)])
    assert values.brier == pytest.approx([0.09 + 0.04 + 0.01, 0.36 + 0.36, 3 * 0.0625 + 0.5625])
    assert values.confidence == pytest.approx([0.7, 0.6, 0.25])


def test_ece_by_hand():
    # bins of width 0.5: {0.3 (right), 0.4 (wrong)} and {0.9 (right), 0.8 (right)}
    confidence = np.array([0.3, 0.4, 0.9, 0.8])
    correct = np.array([1.0, 0.0, 1.0, 1.0])
    low = abs(0.5 - 0.35)
    high = abs(1.0 - 0.85)
    assert cal.ece(confidence, correct, bins=2) == pytest.approx(0.5 * low + 0.5 * high)
    table = cal.reliability(confidence, correct, bins=2)
    assert table[0] == (2, 0.5, pytest.approx(0.35)) and table[1] == (2, 1.0, pytest.approx(0.85))
    assert cal.reliability(np.array([1.0]), np.array([1.0]), bins=15)[-1][0] == 1  # 1.0: last bin
    # bins are closed on the right (Guo et al.): a vote share of 4/8 or 3/10 sits below its edge
    assert cal.reliability(np.array([0.5, 0.0]), np.array([1.0, 0.0]), bins=2)[0][0] == 2
    assert cal.reliability(np.array([3 / 10]), np.array([1.0]), bins=10)[2][0] == 1
    assert cal.ece(np.array([0.6, 0.6]), np.array([1.0, 0.0])) == pytest.approx(0.1)


def test_predictive_and_disagreement():
    draws = [[0.9, 0.1], [0.1, 0.9]]
    assert cal.predictive(draws) == pytest.approx([0.5, 0.5])
    assert cal.mutual_information(draws) == pytest.approx(
        math.log(2) - (-(0.9 * math.log(0.9) + 0.1 * math.log(0.1)))
    )
    assert cal.mutual_information([[0.3, 0.7], [0.3, 0.7]]) == 0.0
    assert cal.softmax_over([math.log(0.2), math.log(0.6)]) == pytest.approx([0.25, 0.75])


def test_temperature_scaling_recovers_the_temperature_that_made_the_labels():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (4000, 4))
    true_t = 2.5
    labels = [int(rng.choice(4, p=cal.softmax_over(z / true_t))) for z in logits]
    assert cal.fit_temperature(logits, labels) == pytest.approx(true_t, rel=0.1)
