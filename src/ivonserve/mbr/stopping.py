"""Early stopping of a fan-out: when may the candidates still running be aborted?

Pure (numpy, the standard library and ``mbr``'s own selection); the engine feeds a ``Tracker``
as candidates finish and aborts the rest once ``Tracker.should_stop()`` says so. Rules:

``off``
    every candidate runs to its end (today's behaviour).

``exact``
    stop only when the request's outcome can no longer change, whatever the candidates still
    running produce: the winning answer AND the chosen candidate (the cluster's representative)
    are those of the full budget, and the selection over the finished candidates alone picks
    that same candidate. For the ``answer`` utility (and ``majority``, which always uses it) with
    ``flat``, ``model`` and ``majority`` and their ``_weighted`` forms; see ``exact_winner``.

``confidence``
    Adaptive-Consistency's Beta criterion (Aggarwal et al. 2023, ``BetaStoppingCriteria``): with
    a and b the counts of the two commonest answers among the finished candidates, stop when
    P(p > 1/2) >= threshold for p ~ Beta(a + 1, b + 1), i.e. the posterior probability that the
    leader is the mode of a two-way vote, once at least ``min_finished`` candidates finished.
    Counts are over extractable answers (texts without one agree with nothing), pooled over the
    draws whatever the selection method; the response is then selected from the finished ones.

Free-text utilities (chrf, bleu, rouge_l, token_f1) have no bound used here: they allow ``off``
only (``unsupported`` says why for a given method and utility).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .methods import Flat, Model, _mean_logprob, get_method, select
from .types import Candidate
from .utilities import cached_extract_answer

__all__ = [
    "DEFAULT_MIN_FINISHED",
    "DEFAULT_THRESHOLD",
    "RULES",
    "Pending",
    "StopPolicy",
    "Tracker",
    "beta_confidence",
    "confidence_reached",
    "exact_winner",
    "unsupported",
]

RULES = ("off", "exact", "confidence")
DEFAULT_THRESHOLD = 0.95
DEFAULT_MIN_FINISHED = 4
# a worst-case margin must exceed this (relative) to count as a strict win: select() calls
# scores within 1e-12 of each other a tie, and our bounds are summed in another order
_MARGIN_RTOL = 1e-9


@dataclass(frozen=True)
class StopPolicy:
    """One request's rule; ``threshold`` and ``min_finished`` apply to ``confidence``."""

    rule: str = "off"
    threshold: float = DEFAULT_THRESHOLD
    min_finished: int = DEFAULT_MIN_FINISHED

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"unknown early_stop rule {self.rule!r}; valid: {', '.join(RULES)}")
        if not 0.5 <= self.threshold <= 1.0:
            raise ValueError(f"early_stop_threshold must be in [0.5, 1], got {self.threshold}")
        if self.min_finished < 1:
            raise ValueError(f"min_finished must be >= 1, got {self.min_finished}")

    @property
    def active(self) -> bool:
        return self.rule != "off"


def unsupported(rule: str, method: str, utility: str) -> str | None:
    """None if ``rule`` is allowed with this selection method and utility, else why not."""
    if rule == "off":
        return None
    if rule not in RULES:
        return f"unknown rule {rule!r}; valid: {', '.join(RULES)}"
    _, method_obj = get_method(method)
    if not isinstance(method_obj, Flat | Model):
        return f"early_stop {rule!r} knows the methods flat, model and majority, not {method!r}"
    if method_obj.uses_utility and utility != "answer":
        return (
            f"early_stop {rule!r} needs the 'answer' utility (or selection 'majority'); "
            f"with {utility!r} only 'off' is allowed (no bound on a free-text utility)"
        )
    return None


# --- confidence: Adaptive-Consistency's Beta criterion ------------------------------------------
def beta_confidence(a: int, b: int) -> float:
    """P(p > 1/2) for p ~ Beta(a + 1, b + 1): Adaptive-Consistency's
    int_{1/2}^1 x^a (1-x)^b dx / int_0^1 x^a (1-x)^b dx, in closed form for counts a, b >= 0.

    For integer shapes P(Beta(a+1, b+1) > x) = P(Binomial(a+b+1, x) <= a), so at x = 1/2 it is
    sum_{k=0}^{a} C(a+b+1, k) / 2^(a+b+1), summed exactly in integers."""
    if int(a) != a or int(b) != b or a < 0 or b < 0:
        raise ValueError(f"counts are integers >= 0, got a={a}, b={b}")
    a, b = int(a), int(b)
    n = a + b + 1
    return sum(math.comb(n, k) for k in range(a + 1)) / 2**n


def confidence_reached(
    answers: Sequence[str | None], threshold: float, min_finished: int = 1
) -> bool:
    """The Beta criterion on the finished candidates' answers (None: no answer, never counted)."""
    if len(answers) < min_finished:
        return False
    top = Counter(a for a in answers if a is not None).most_common(2)
    if not top:
        return False
    a = top[0][1]
    b = top[1][1] if len(top) > 1 else 0
    return beta_confidence(a, b) >= threshold


# --- exact ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pending:
    """A candidate still running: its hypothesis set (draw) and its cumulative log-probability so
    far (<= 0; 0 before its first token). Its final length-normalised log-probability is at most
    ``logprob / max_tokens`` (log-probabilities only fall, and it ends within max_tokens)."""

    draw: int
    logprob: float = 0.0

    def mean_bound(self, max_tokens: int) -> float:
        return min(0.0, self.logprob) / max(max_tokens, 1)


def exact_winner(slots: Sequence[Candidate | Pending], method: str, max_tokens: int) -> int | None:
    """The slot ``select(all slots, method, "answer")`` will pick once every ``Pending`` has
    finished, if that is already certain, and the finished candidates alone pick it too; else
    None. ``slots`` are in the order of the full candidate list (draw-major).

    Scores with the answer utility are sums of reference weights per answer (w = 1, weighted:
    q = exp(mean logprob)). A pending candidate may join any answer (or a new one) with any
    weight up to its bound Q (1, weighted: exp(mean_bound)). Winner: answer a* such that for
    every other answer b (seen or new) the worst case still leaves a* strictly ahead:

    * flat, majority (one pool, one normaliser):  S(a*) - S(b) - sum_pending Q > 0
    * model (Eq. 10: per draw m, the share of its references, counted where m produced the
      answer; T_m finished weight, X_m = sum of its pending Q):
      sum_m (A_m(a*) - A_m(b) - X_m) / (T_m + X_m) > 0  (every pending of draw m voting b at
      its largest weight is the worst case: the difference falls as X_m grows)

    Representative: the answer's candidates tie, and ``select`` breaks ties by the highest mean
    logprob, then the lowest index. The best finished member must outrank every pending
    candidate's bound (mean_bound, its index): a pending one could still join the cluster.
    """
    _, method_obj = get_method(method)
    if not isinstance(method_obj, Flat | Model):
        raise ValueError(f"exact stopping knows flat, model and majority, not {method!r}")
    finished = [(i, s) for i, s in enumerate(slots) if isinstance(s, Candidate)]
    pending = [(i, s) for i, s in enumerate(slots) if isinstance(s, Pending)]
    if not finished:
        return None
    if not pending:
        chosen = select([c for _, c in finished], method, "answer")
        return finished[chosen.index][0]
    answers = [cached_extract_answer(c.text) for _, c in finished]
    if all(a is None for a in answers):
        return None  # no finished candidate is eligible yet
    weighted = method_obj.config.weighted
    bounds = [p.mean_bound(max_tokens) for _, p in pending]
    if weighted:
        means = [_mean_logprob(c) for _, c in finished]
        if any(m is None or not math.isfinite(m) for m in means):
            return None  # select() will refuse these; nothing to decide
        shift = max(max(means), max(bounds))
        w = np.exp(np.array(means) - shift)
        q = np.exp(np.array(bounds) - shift)
    else:
        w = np.ones(len(finished))
        q = np.ones(len(pending))

    labels = sorted({a for a in answers if a is not None})
    index = {a: k for k, a in enumerate(labels)}
    if isinstance(method_obj, Model):
        draws = sorted({s.draw for s in slots})
        group = {d: m for m, d in enumerate(draws)}
        finished_group = np.array([group[c.draw] for _, c in finished])
        pending_group = np.array([group[p.draw] for _, p in pending])
    else:  # one pool
        draws = [0]
        finished_group = np.zeros(len(finished), dtype=int)
        pending_group = np.zeros(len(pending), dtype=int)
    n_groups = len(draws)
    # A[m, k]: finished weight of answer k in group m (a last column: a new answer, weight 0)
    A = np.zeros((n_groups, len(labels) + 1))
    for k, answer in enumerate(answers):
        if answer is not None:
            A[finished_group[k], index[answer]] += w[k]
    T = np.bincount(finished_group, weights=w, minlength=n_groups)
    X = np.bincount(pending_group, weights=q, minlength=n_groups)

    if isinstance(method_obj, Model):
        denominator = T + X  # > 0: every group has at least one slot
        lead = int(np.argmax((A[:, :-1] / denominator[:, None]).sum(axis=0)))
        margins = ((A[:, [lead]] - A - X[:, None]) / denominator[:, None]).sum(axis=0)
        scale = 1.0
    else:
        lead = int(np.argmax(A[0, :-1]))
        margins = A[0, lead] - A[0] - X[0]
        scale = float(T[0] + X[0])
    margins[lead] = np.inf
    if not np.all(margins > _MARGIN_RTOL * scale):
        return None

    winner_answer = labels[lead]
    members = [k for k, a in enumerate(answers) if a == winner_answer]
    best = max(members, key=lambda k: _rank(finished[k][1], finished[k][0]))
    best_slot, best_candidate = finished[best]
    best_mean = _mean_logprob(best_candidate)
    if best_mean is None:
        return None
    for (slot, _), bound in zip(pending, bounds, strict=True):
        if bound > best_mean or (bound == best_mean and slot < best_slot):
            return None
    chosen = select([c for _, c in finished], method, "answer")
    return best_slot if finished[chosen.index][0] == best_slot else None


def _rank(c: Candidate, slot: int) -> tuple[bool, float, int]:
    """select()'s tie-break order: has a logprob, higher mean logprob, lower index."""
    mean = _mean_logprob(c)
    return (mean is not None, mean if mean is not None else 0.0, -slot)


# --- the tracker the engine feeds ---------------------------------------------------------------
class Tracker:
    """The stopping state of one fan-out of ``n_draws`` hypothesis sets x ``n_samples``; slot
    ``d * n_samples + s`` is sample s of the d-th draw (the engine's draw-major order).

    The engine calls ``finished`` as each candidate ends, ``progress`` as a running one grows,
    and ``should_stop`` after each engine output; it is cheap when nothing changed. ``exact``
    re-decides at every finish and, as the running candidates' bounds only tighten, about once
    per engine step (every ``len(slots)`` progress updates) in between."""

    def __init__(
        self, policy: StopPolicy, method: str, n_draws: int, n_samples: int, max_tokens: int
    ) -> None:
        if policy.rule == "exact":
            get_method(method)  # a bad name fails here, not at the first finish
        self.policy = policy
        self.method = method
        self.n_samples = n_samples
        self.max_tokens = max_tokens
        self.slots: list[Candidate | Pending] = [
            Pending(draw=slot // n_samples) for slot in range(max(1, n_draws) * n_samples)
        ]
        self.answers: list[str | None] = []
        self.decided: int | None = None  # exact: the slot it decided on
        self._finished_since = False
        self._progress_since = 0

    @property
    def n_finished(self) -> int:
        return len(self.answers)

    def finished(self, slot: int, text: str, logprob: float | None, tokens: int | None) -> None:
        draw = slot // self.n_samples
        self.slots[slot] = Candidate(draw=draw, text=text, logprob=logprob, tokens=tokens)
        self.answers.append(cached_extract_answer(text))
        self._finished_since = True

    def progress(self, slot: int, logprob: float | None) -> None:
        current = self.slots[slot]
        if isinstance(current, Pending) and logprob is not None and logprob < current.logprob:
            self.slots[slot] = Pending(current.draw, logprob)
            self._progress_since += 1

    def should_stop(self) -> bool:
        """True when the candidates still running may be aborted (never when none runs)."""
        rule = self.policy.rule
        if rule == "off" or self.n_finished >= len(self.slots):
            return False
        if rule == "confidence":
            if not self._finished_since:
                return False
            self._finished_since = False
            p = self.policy
            return confidence_reached(self.answers, p.threshold, p.min_finished)
        if not self._finished_since and self._progress_since < len(self.slots):
            return False
        if self.n_finished == 0:
            return False
        self._finished_since = False
        self._progress_since = 0
        self.decided = exact_winner(self.slots, self.method, self.max_tokens)
        return self.decided is not None

    def still_decided(self) -> bool:
        """After the rule fired, ``finished`` was told of candidates that ended in that same
        engine step: may they join the answer? ``confidence``: yes (more finished votes);
        ``exact``: if the decision stands with them (it always does for the full budget; this
        also re-checks that the finished candidates alone pick the same one)."""
        if self.policy.rule != "exact":
            return True
        return self.decided is not None and (
            exact_winner(self.slots, self.method, self.max_tokens) == self.decided
        )
