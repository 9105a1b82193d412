"""The posterior predictive of a continuation from its draws' log-likelihoods (pure numpy).

With n draws theta_0..theta_{n-1} of the posterior (a request's n_models) and log p_d(y | x) the
teacher-forced log-likelihood of continuation y under draw d:

* sequence predictive (Bayesian model averaging of the whole continuation):
  log p(y | x) = logsumexp_d log p_d(y | x) - log n
* token predictive (what a next-token scorer such as lm-eval sees): at each position t,
  log p(y_t | x, y_<t) = logsumexp_d log p_d(y_t | x, y_<t) - log n
* disagreement: log p(y | x) - (1/n) sum_d log p_d(y | x) >= 0 (nats), the Jensen gap between
  averaging the draws' probabilities and averaging their log-probabilities. It is 0 exactly
  when every draw gives y the same likelihood, grows with their spread, is in the units of the
  log-likelihood it corrects, and is the whole of what the predictive gains over a typical
  single draw on this y: the epistemic part of the score.

n = 1 (or the mean adapter alone) gives the draw's own log-likelihood and disagreement 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["disagreement", "sequence_predictive", "token_predictive"]


def _logmeanexp(values: np.ndarray, axis: int | None = None) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    top = np.max(values, axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    summed = np.log(np.sum(np.exp(values - top), axis=axis, keepdims=True)) + top
    count = values.shape[axis] if axis is not None else values.size
    out = summed - math.log(count)
    return out.squeeze(axis) if axis is not None else out.reshape(())


def sequence_predictive(draws: Sequence[float]) -> float:
    """log of the mean of the draws' sequence probabilities, from their log-likelihoods."""
    if len(draws) == 0:
        raise ValueError("the predictive needs at least one draw")
    return float(_logmeanexp(np.asarray(draws)))


def token_predictive(per_draw: Sequence[Sequence[float]]) -> list[float]:
    """Per position, the log of the mean of the draws' token probabilities (draws x tokens in)."""
    values = np.asarray(per_draw, dtype=np.float64)
    if values.ndim != 2 or values.shape[0] == 0:
        raise ValueError("token_predictive needs a (draws, tokens) array with >= 1 draw")
    return _logmeanexp(values, axis=0).tolist()


def disagreement(draws: Sequence[float]) -> float:
    """The predictive minus the mean log-likelihood (>= 0; 0 when the draws agree)."""
    gap = sequence_predictive(draws) - float(np.mean(draws))
    return max(0.0, gap)  # rounding can make an exact 0 a tiny negative
