"""The posterior predictive's arithmetic, against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ivonserve.predictive import disagreement, sequence_predictive, token_predictive


def test_sequence_predictive_is_the_log_of_the_mean_probability():
    draws = [math.log(0.5), math.log(0.1), math.log(0.3)]
    assert sequence_predictive(draws) == pytest.approx(math.log(0.3))
    # logsumexp minus log K, exactly as defined
    assert sequence_predictive(draws) == pytest.approx(
        np.logaddexp.reduce(draws) - math.log(len(draws))
    )


def test_one_draw_is_itself_and_agreeing_draws_do_not_disagree():
    assert sequence_predictive([-12.5]) == -12.5
    assert disagreement([-12.5]) == 0.0
    assert sequence_predictive([-3.0] * 8) == pytest.approx(-3.0)
    assert disagreement([-3.0] * 8) == 0.0


def test_very_unlikely_sequences_do_not_underflow():
    draws = [-2000.0, -2001.0]
    expected = -2000.0 + math.log((1 + math.exp(-1)) / 2)
    assert sequence_predictive(draws) == pytest.approx(expected)


def test_disagreement_is_the_jensen_gap_and_grows_with_the_spread():
    # p = 0.5 and 0.1: log(0.3) - (log 0.5 + log 0.1) / 2
    expected = math.log(0.3) - (math.log(0.5) + math.log(0.1)) / 2
    assert disagreement([math.log(0.5), math.log(0.1)]) == pytest.approx(expected)
    narrow = disagreement([-10.0, -10.5])
    wide = disagreement([-10.0, -14.0])
    assert 0 < narrow < wide


def test_token_predictive_averages_probabilities_per_position():
    per_draw = [[math.log(0.5), math.log(0.2)], [math.log(0.1), math.log(0.4)]]
    assert token_predictive(per_draw) == pytest.approx([math.log(0.3), math.log(0.3)])
    # per token and per sequence differ: the sequence averages products, not per-token means
    assert sum(token_predictive(per_draw)) != pytest.approx(
        sequence_predictive([sum(row) for row in per_draw])
    )


def test_no_draw_is_an_error():
    with pytest.raises(ValueError):
        sequence_predictive([])
    with pytest.raises(ValueError):
        token_predictive(np.zeros((0, 3)))
