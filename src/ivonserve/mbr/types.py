"""The data types of selection: a candidate in, a selection out."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Candidate", "Selection"]


@dataclass(frozen=True, slots=True)
class Candidate:
    """One sampled completion.

    draw: index of the posterior draw that produced it (candidates with equal ``draw`` form one
        hypothesis set H_m for the ``model`` method).
    text: the completion.
    logprob: cumulative log-probability of the sequence (sum over its tokens), or None.
    tokens: number of generated tokens, for length normalisation (logprob / tokens), or None.
    """

    draw: int
    text: str
    logprob: float | None = None
    tokens: int | None = None


@dataclass(frozen=True, slots=True)
class Selection:
    """The outcome of ``select``.

    index: position of the chosen candidate in the input list.
    text, answer: its text and its normalised final answer (None if it has none).
    confidence: in [0, 1]; for the ``answer`` utility and ``majority`` the (weighted) share of
        the candidates whose answer equals the winner's, otherwise the winner's expected utility.
    scores: one score per input candidate, the quantity the method maximises (see the method).
    method, utility: the names used.
    answers: the normalised final answer of every input candidate (None where there is none).
    """

    index: int
    text: str
    answer: str | None
    confidence: float
    scores: tuple[float, ...]
    method: str
    utility: str
    answers: tuple[str | None, ...] = ()
