"""The statistics every benchmark reports: intervals over questions, paired differences between
arms on the same questions, the exact McNemar test, and how well a confidence ranks answers.

Pure numpy. Intervals are percentile bootstraps over questions resampled with replacement; one
seed draws the same resamples for every statistic of a run, so statistics of the same questions
stay paired (a difference's interval is the interval of the paired differences).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95


def resample_indices(n: int, seed: int = 0, resamples: int = RESAMPLES) -> np.ndarray:
    """(resamples, n) question indices drawn with replacement: the same for the same seed."""
    return np.random.default_rng(seed).integers(0, n, (resamples, n))


def percentile_interval(values: np.ndarray, level: float = LEVEL) -> list[float]:
    tail = (1 - level) / 2 * 100
    return [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]


def bootstrap(
    statistic: Callable[[np.ndarray], float], n: int, seed: int = 0, resamples: int = RESAMPLES
) -> list[float]:
    """95% interval of ``statistic(indices)``, for a statistic that is no plain mean (ECE)."""
    picks = resample_indices(n, seed, resamples)
    return percentile_interval(np.array([statistic(p) for p in picks]))


def bootstrap_ci(
    numerator: np.ndarray,
    denominator: np.ndarray | None = None,
    resamples: int = RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
) -> list[float]:
    """Interval of sum(numerator) / sum(denominator) (the mean when no denominator): the NLL per
    token of a likelihood run, an accuracy, or a paired difference of either."""
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.ones_like(numerator) if denominator is None else np.asarray(denominator)
    picks = resample_indices(numerator.size, seed, resamples)
    values = numerator[picks].sum(axis=1) / denominator[picks].sum(axis=1)
    return percentile_interval(values, level)


def wilson_interval(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval: sane at 0% and 100%, unlike the normal approximation."""
    if total == 0:
        return (0.0, 0.0)
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts: b questions right in A only,
    c in B only. Under equal accuracy each discordant question is a fair coin, so
    p = min(1, 2 P[Binomial(b + c, 1/2) <= min(b, c)])."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_accuracy(a: np.ndarray, b: np.ndarray, seed: int = 0) -> dict:
    """Accuracy of A minus B on the same questions (1.0/0.0 per question), its bootstrap
    interval, the questions only one of them got right, and McNemar's p."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired arms need the same questions ({a.size} against {b.size})")
    a_only, b_only = int(np.sum((a == 1) & (b == 0))), int(np.sum((a == 0) & (b == 1)))
    return {
        "diff": float(np.mean(a - b)),
        "diff_ci95": bootstrap_ci(a - b, seed=seed),
        "a_only": a_only,
        "b_only": b_only,
        "p_mcnemar": mcnemar_exact(a_only, b_only),
    }


def auroc(confidence: np.ndarray, correct: np.ndarray) -> float | None:
    """P(a right answer's confidence > a wrong one's), ties counting half (the Mann-Whitney
    statistic); None when every answer is right or every one wrong."""
    confidence, correct = np.asarray(confidence, dtype=np.float64), np.asarray(correct, bool)
    n_right, n_wrong = int(correct.sum()), int((~correct).sum())
    if n_right == 0 or n_wrong == 0:
        return None
    ranks = _average_ranks(confidence)
    return float((ranks[correct].sum() - n_right * (n_right + 1) / 2) / (n_right * n_wrong))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(values.size)
    ranks[order] = np.arange(1, values.size + 1)
    for value in np.unique(values):
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def accuracy_at_coverage(confidence: np.ndarray, correct: np.ndarray, coverage: float) -> float:
    """Accuracy on the ``coverage`` share of questions answered most confidently (the rest
    abstained). Questions tied at the cut-off count in proportion, as a random pick among them
    would on average: vote shares take few values, so ties are the rule, not the exception."""
    confidence, correct = np.asarray(confidence, np.float64), np.asarray(correct, np.float64)
    if not 0 < coverage <= 1:
        raise ValueError(f"coverage is in (0, 1], got {coverage}")
    take = coverage * confidence.size
    cut = np.sort(confidence)[::-1][math.ceil(take) - 1]
    above = confidence > cut
    tied = confidence == cut
    from_tied = take - above.sum()
    right = correct[above].sum() + from_tied * correct[tied].mean()
    return float(right / take)
