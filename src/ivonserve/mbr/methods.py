"""Selection methods (decoders, in mbrs's terms), their registry, and ``select``.

Notation: candidates y_1..y_N, draw m(i) of candidate i (``Candidate.draw``), H_m = the
candidates of draw m, M = number of distinct draws, u = the utility matrix
u[i, j] = u(y_i, y_j) in [0, 1].
Reference weights w: uniform, or for the ``*_weighted`` methods the length-normalised sequence
probability q_j = exp(logprob_j / tokens_j), normalised to sum 1 over the pool (flat, majority)
or over each draw (model). Every candidate, itself included, is a reference (u[i, i] counts).

* ``flat``      score_i = sum_j w_j u[i, j]                       (Eq. 9, w_j = 1/N)
* ``model``     s_m(i)  = sum_{j in H_m} w^m_j u[i, j]            (w^m_j = 1/|H_m|)
                score_i = sum_{m : y_i in H_m} s_m(i)             (Eq. 10: the draws that
                produced the hypothesis y_i: some candidate of draw m has exactly that text,
                or, under the ``answer`` utility, that final answer)
* ``majority``  score_i = sum_j w_j [a_i = a_j != None]           (self-consistency vote;
                ``flat`` with the ``answer`` utility, whatever utility is passed)

Confidence of the winner i*: its expected utility under the reference distribution,
flat/majority: score_i*; model: (1/M) sum_m s_m(i*) (all draws, equally weighted). With the
``answer`` utility this is the (weighted) share of candidates whose answer equals the winner's.

Winner: argmax of score; if any candidate has an extractable answer, only those are eligible
(``require_answer=True``, the default). Ties (|diff| <= 1e-12 relative) go to the highest mean
log-probability logprob / tokens (logprob when tokens is None; no logprob ranks last), then to
the lowest index.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .registry import Registry
from .types import Candidate, Selection
from .utilities import Utility, cached_extract_answer, get_utility, unique_texts

__all__ = [
    "METHODS",
    "Flat",
    "Majority",
    "Method",
    "MethodConfig",
    "Model",
    "get_method",
    "register_method",
    "select",
    "sequence_weights",
]

_TIE_RTOL = 1e-12


@dataclass(frozen=True)
class MethodConfig:
    """weighted: weight the references by their length-normalised sequence probability."""

    weighted: bool = False


def _mean_logprob(c: Candidate) -> float | None:
    if c.logprob is None:
        return None
    return c.logprob / max(c.tokens, 1) if c.tokens is not None else c.logprob


def sequence_weights(candidates: Sequence[Candidate], method: str = "weighted") -> np.ndarray:
    """log q_j = logprob_j / tokens_j for every candidate (unnormalised, log space).

    Raises ValueError if a candidate has no logprob, a non-finite one, or if ``tokens`` is
    given for some candidates but not for others.
    """
    missing = [i for i, c in enumerate(candidates) if c.logprob is None]
    if missing:
        raise ValueError(
            f"method {method!r} weights candidates by their sequence probability and needs "
            f"Candidate.logprob for every candidate; missing for candidate(s) {missing[:10]}"
        )
    bad = [i for i, c in enumerate(candidates) if not math.isfinite(c.logprob)]
    if bad:
        raise ValueError(f"method {method!r}: non-finite logprob for candidate(s) {bad[:10]}")
    has_tokens = [c.tokens is not None for c in candidates]
    if any(has_tokens) and not all(has_tokens):
        raise ValueError(
            f"method {method!r}: Candidate.tokens is given for some candidates but not all "
            "(length normalisation needs all or none)"
        )
    return np.array([_mean_logprob(c) for c in candidates], dtype=np.float64)


def _normalise(log_q: np.ndarray) -> np.ndarray:
    w = np.exp(log_q - log_q.max())
    return w / w.sum()


class Method:
    """Base class: ``score(u, candidates) -> (scores, expected)``, both one float per candidate.

    ``scores`` is what the method maximises; ``expected`` the expected utility of choosing each
    candidate (the confidence reported for the winner).
    """

    name: ClassVar[str] = "method"
    uses_utility: ClassVar[bool] = True

    def __init__(self, config: MethodConfig | None = None):
        self.config = config or MethodConfig()

    @property
    def label(self) -> str:
        return self.name + ("_weighted" if self.config.weighted else "")

    def _pool_weights(self, candidates: Sequence[Candidate]) -> np.ndarray:
        n = len(candidates)
        if not self.config.weighted:
            return np.full(n, 1.0 / n)
        return _normalise(sequence_weights(candidates, self.label))

    def score(
        self, u: np.ndarray, candidates: Sequence[Candidate], keys: Sequence[Hashable] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - abstract
        """keys: hypothesis identity of each candidate (``Utility.hypothesis_keys``; texts)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


class Flat(Method):
    """Eq. 9 (flat MBR): score_i = sum_j w_j u(y_i, y_j) over the pooled N = M*S candidates.

    w_j = 1/N; weighted: w_j = q_j / sum_k q_k with q_j = exp(logprob_j / tokens_j).
    confidence = score of the winner (its expected utility).
    """

    name = "flat"

    def score(self, u: np.ndarray, candidates: Sequence[Candidate], keys=None):
        scores = u @ self._pool_weights(candidates)
        return scores, scores


class Majority(Flat):
    """Self-consistency: score_i = sum_j w_j [a_i = a_j], a = extracted answer (None never agrees).

    Identical to ``flat`` with the ``answer`` utility; ``select`` always uses that utility for it.
    confidence = the (weighted) share of candidates whose answer is the winner's.
    """

    name = "majority"
    uses_utility = False


class Model(Method):
    """Eq. 10 (model-wise MBR, the default).

    Per draw m with hypothesis set H_m: s_m(y) = sum_{y' in H_m} w^m_{y'} u(y, y')
    (w^m = 1/|H_m|; weighted: q normalised within the draw). Each distinct hypothesis y is
    scored by the draws that produced it: score(y) = sum_{m : y in H_m} s_m(y); every candidate
    gets the score of its hypothesis (duplicates share it). A hypothesis is a distinct text,
    except under the ``answer`` utility, to which texts with the same final answer are the same
    hypothesis (``Utility.hypothesis_keys``): there "y in H_m" means "draw m produced that
    answer". A hypothesis sampled by several draws collects several terms, so agreement
    *across* posterior draws is rewarded; unlike ``flat``, a draw's samples are compared only
    with the samples of the same draw. With an exact-match utility (``answer``) and equal sample
    counts it picks what ``flat`` picks (score = M * flat score); with unequal counts or a soft
    utility it can differ. confidence = (1/M) sum_m s_m(winner), the expected utility under the
    equal mixture of the M draws.
    """

    name = "model"

    def score(self, u: np.ndarray, candidates: Sequence[Candidate], keys=None):
        n = len(candidates)
        draws = np.array([c.draw for c in candidates])
        draw_ids, draw_of = np.unique(draws, return_inverse=True)
        draw_of = draw_of.reshape(-1)
        n_draws = draw_ids.size
        log_q = sequence_weights(candidates, self.label) if self.config.weighted else None
        # w[j, m] = weight of reference j within draw m (0 outside the draw)
        w = np.zeros((n, n_draws))
        for m in range(n_draws):
            members = np.flatnonzero(draw_of == m)
            w[members, m] = _normalise(log_q[members]) if log_q is not None else 1.0 / members.size
        s = u @ w  # s[i, m] = s_m(y_i)
        if keys is None:
            keys = [c.text for c in candidates]
        _, hyp_of = unique_texts(keys)
        produced = np.zeros((hyp_of.max() + 1, n_draws), dtype=bool)
        produced[hyp_of, draw_of] = True
        scores = np.where(produced[hyp_of], s, 0.0).sum(axis=1)
        return scores, s.mean(axis=1)


METHODS: Registry[Method] = Registry("method")


def register_method(name: str, method: Method) -> Method:
    """Register a method instance under ``name`` (a name already taken is an error)."""
    return METHODS.register(name, method)


for _cls in (Flat, Model, Majority):
    register_method(_cls.name, _cls())
    register_method(f"{_cls.name}_weighted", _cls(MethodConfig(weighted=True)))


def get_method(method: str | Method) -> tuple[str, Method]:
    """(name, instance) for a registry name or a ``Method``; ValueError lists the valid names."""
    if isinstance(method, Method):
        return method.label, method
    if isinstance(method, str):
        return method, METHODS.resolve(method)
    raise TypeError(f"method must be a name or a Method, not {type(method).__name__}")


def _check_utility_matrix(u: np.ndarray, n: int, name: str) -> None:
    if u.shape != (n, n):
        raise ValueError(f"utility {name!r} returned a matrix of shape {u.shape}, not {(n, n)}")
    if not np.all(np.isfinite(u)) or u.min() < -1e-9 or u.max() > 1 + 1e-9:
        raise ValueError(
            f"utility {name!r} must return finite values in [0, 1]; got range "
            f"[{np.nanmin(u):.6g}, {np.nanmax(u):.6g}]"
        )


def _pick(scores: np.ndarray, eligible: np.ndarray, candidates: Sequence[Candidate]) -> int:
    masked = np.where(eligible, scores, -np.inf)
    best = masked.max()
    tied = np.flatnonzero(eligible & (np.abs(scores - best) <= _TIE_RTOL * max(1.0, abs(best))))
    if tied.size == 1:
        return int(tied[0])

    def rank(i: int) -> tuple[bool, float, int]:
        mean = _mean_logprob(candidates[i])
        return (mean is not None, mean if mean is not None else 0.0, -i)

    return int(max(tied.tolist(), key=rank))


def select(
    candidates: Sequence[Candidate],
    method: str | Method = "model",
    utility: str | Utility | Callable[[str, str], float] = "answer",
    *,
    require_answer: bool = True,
) -> Selection:
    """Pick the consensus candidate by Minimum Bayes Risk.

    candidates: the samples (``Candidate(draw, text, logprob, tokens)``); not empty.
    method: a name in ``METHODS`` (flat, model, majority and their ``_weighted`` variants) or a
        ``Method``.
    utility: a name in ``UTILITIES`` (answer, chrf, bleu, rouge_l, token_f1), a ``Utility``, or
        any callable (hypothesis, reference) -> float in [0, 1]. ``majority`` always votes with
        ``answer`` (the name is still checked).
    require_answer: if any candidate has an extractable answer, pick among those only.
        (Keep the default for math; pass False for free-text tasks where numbers are incidental.)

    A single candidate is returned as is: index 0, confidence 1.0, scores (1.0,).

    Raises ValueError for no candidates, an unknown method or utility name (the message lists
    the valid names), a missing logprob for a weighted method, or utility values outside [0, 1].
    """
    method_name, method_obj = get_method(method)
    utility_name, utility_obj = get_utility(utility)  # unknown names fail for every method
    if not method_obj.uses_utility:
        utility_name, utility_obj = get_utility("answer")
    candidates = list(candidates)
    if not candidates:
        raise ValueError("select() needs at least one candidate; got an empty list")
    for i, c in enumerate(candidates):
        if not isinstance(c, Candidate):
            raise TypeError(f"candidate {i} is a {type(c).__name__}, not a Candidate")
    n = len(candidates)
    texts = [c.text for c in candidates]
    distinct, inverse = unique_texts(texts)
    distinct_answers = [cached_extract_answer(t) for t in distinct]
    answers = [distinct_answers[k] for k in inverse]

    if n == 1:
        # still validate the weighted method's inputs, so errors do not depend on N
        if getattr(method_obj.config, "weighted", False):
            sequence_weights(candidates, method_name)
        return Selection(
            0, texts[0], answers[0], 1.0, (1.0,), method_name, utility_name, tuple(answers)
        )

    u = np.asarray(utility_obj.matrix(texts), dtype=np.float64)
    _check_utility_matrix(u, n, utility_name)
    u = np.clip(u, 0.0, 1.0)
    scores, expected = method_obj.score(u, candidates, utility_obj.hypothesis_keys(texts))
    has_answer = np.array([a is not None for a in answers])
    eligible = has_answer if (require_answer and has_answer.any()) else np.ones(n, dtype=bool)
    index = _pick(scores, eligible, candidates)
    confidence = float(min(1.0, max(0.0, expected[index])))
    return Selection(
        index=index,
        text=texts[index],
        answer=answers[index],
        confidence=confidence,
        scores=tuple(float(s) for s in scores),
        method=method_name,
        utility=utility_name,
        answers=tuple(answers),
    )
