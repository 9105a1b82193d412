"""How good and how honest a multiple-choice predictor is (pure numpy): accuracy, NLL, Brier
score, expected calibration error and the reliability diagram's bins. The ECE and its bins serve
the served answers' confidence too (`bench gsm8k`, `bench tts`), over ``ANSWER_ECE_BINS``.

A prediction is one probability vector over a question's choices (2 to 5 of them, so the vectors
of a data set may differ in length). Per-question values are kept so that intervals can be had by
resampling questions and arms compared question by question. ECE uses equal-width confidence bins
(15 by default, the count of Guo et al. 2017 and of the IVON-LoRA paper's evaluation):
ECE = sum_b (n_b / N) |accuracy_b - confidence_b|, with a prediction's confidence its largest
probability.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

ECE_BINS = 15
# A served answer's confidence is a vote share or an expected utility over a few dozen
# candidates: coarse values, so fewer bins (as `bench gsm8k` has always reported them).
ANSWER_ECE_BINS = 10


@dataclass(frozen=True)
class PerQuestion:
    correct: np.ndarray  # 1.0 where the likeliest choice is the right one
    nll: np.ndarray  # -log p(right choice), nats
    brier: np.ndarray  # sum over choices of (p - onehot)^2
    confidence: np.ndarray  # the largest probability


def per_question(probs: Sequence[Sequence[float]], labels: Sequence[int]) -> PerQuestion:
    rows = [np.asarray(p, dtype=np.float64) for p in probs]
    if len(rows) != len(labels) or not rows:
        raise ValueError("one probability vector per label, at least one")
    correct, nll, brier, confidence = [], [], [], []
    for p, label in zip(rows, labels, strict=True):
        onehot = np.zeros_like(p)
        onehot[label] = 1.0
        correct.append(float(np.argmax(p) == label))
        nll.append(-np.log(max(p[label], np.finfo(np.float64).tiny)))
        brier.append(float(np.sum((p - onehot) ** 2)))
        confidence.append(float(np.max(p)))
    return PerQuestion(*(np.array(v) for v in (correct, nll, brier, confidence)))


def ece(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error over equal-width bins of confidence in [0, 1]."""
    table = reliability(confidence, correct, bins)
    n = len(confidence)
    return float(sum(count / n * abs(acc - conf) for count, acc, conf in table if count))


def reliability(
    confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS
) -> list[tuple[int, float, float]]:
    """Per bin: (count, accuracy, mean confidence); empty bins are (0, nan, nan). Bin b holds
    confidences in (b/bins, (b+1)/bins], as Guo et al. 2017 define them, with 0 in the first: a
    vote share of exactly 1/2 falls in the bin that ends at 1/2 (vote shares often sit on edges)."""
    confidence, correct = np.asarray(confidence), np.asarray(correct)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    table = []
    for b in range(bins):
        members = which == b
        count = int(members.sum())
        if count:
            table.append((count, float(correct[members].mean()), float(confidence[members].mean())))
        else:
            table.append((0, float("nan"), float("nan")))
    return table


def summary(values: PerQuestion, bins: int = ECE_BINS) -> dict[str, float]:
    return {
        "accuracy": float(values.correct.mean()),
        "nll": float(values.nll.mean()),
        "ece": ece(values.confidence, values.correct, bins),
        "brier": float(values.brier.mean()),
    }


def softmax_over(logprobs: Sequence[float]) -> np.ndarray:
    """Renormalise log-probabilities of the choices' letters to a distribution over choices."""
    values = np.asarray(logprobs, dtype=np.float64)
    values = np.exp(values - values.max())
    return values / values.sum()


def predictive(per_draw: Sequence[Sequence[float]]) -> np.ndarray:
    """The posterior predictive over choices: the average of the draws' distributions."""
    return np.mean(np.asarray(per_draw, dtype=np.float64), axis=0)


def entropy(p: np.ndarray) -> float:
    p = np.asarray(p, dtype=np.float64)
    nonzero = p[p > 0]
    return float(-np.sum(nonzero * np.log(nonzero)))


def mutual_information(per_draw: Sequence[Sequence[float]]) -> float:
    """H(mean of the draws) - mean of H(draw), nats: how much the draws disagree (the epistemic
    part of the predictive's entropy; 0 for one draw or identical draws)."""
    draws = np.asarray(per_draw, dtype=np.float64)
    gap = entropy(draws.mean(axis=0)) - float(np.mean([entropy(d) for d in draws]))
    return max(0.0, gap)  # rounding can make an exact 0 a tiny negative


def fit_temperature(logits: Sequence[Sequence[float]], labels: Sequence[int]) -> float:
    """The temperature T minimising the NLL of softmax(logits / T) (temperature scaling, Guo et
    al. 2017), by golden-section search of log T in [1/20, 20]: one parameter, convex in
    practice, no optimiser needed."""

    def nll(log_t: float) -> float:
        t = np.exp(log_t)
        return float(
            np.mean(
                [
                    -np.log(softmax_over(np.asarray(z) / t)[y])
                    for z, y in zip(logits, labels, strict=True)
                ]
            )
        )

    lo, hi = np.log(1 / 20), np.log(20)
    ratio = (np.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(60):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(b)
    return float(np.exp((lo + hi) / 2))
