"""Utilities u(hypothesis, reference) in [0, 1] and their registry.

A utility is an object with ``__call__(hypothesis, reference) -> float`` and
``matrix(texts) -> ndarray[N, N]`` where ``matrix(texts)[i, j] == u(texts[i], texts[j])``.
Subclasses of ``Utility`` implement ``_matrix`` on *distinct* texts only: ``matrix`` removes
duplicate texts first (sampling produces many) and expands the result back. A plain Python
callable ``(str, str) -> float`` becomes a ``CallableUtility`` (a loop over the distinct pairs).

The registry ``UTILITIES`` maps a name to a utility instance, as mbrs does with its metrics;
``register_utility`` adds one and ``get_utility`` resolves a name, an instance or a callable.
"""

from __future__ import annotations

import functools
import re
import string
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ivonserve.answers import extract_answer

from . import _ngrams
from .registry import Registry

# extract_answer is pure; select() and the answer utility both need it for the same texts
cached_extract_answer = functools.lru_cache(maxsize=4096)(extract_answer)

__all__ = [
    "UTILITIES",
    "AnswerUtility",
    "CallableUtility",
    "TokenF1",
    "Utility",
    "get_utility",
    "register_utility",
    "unique_texts",
]


def unique_texts(texts: Sequence[Hashable]) -> tuple[list, np.ndarray]:
    """Distinct items in first-seen order and, for each input, the index of its distinct item."""
    index: dict[str, int] = {}
    inverse = np.fromiter(
        (index.setdefault(t, len(index)) for t in texts), dtype=np.int64, count=len(texts)
    )
    return list(index), inverse


class Utility:
    """Base class: a similarity u(hypothesis, reference) in [0, 1], with a pairwise matrix.

    ``symmetric`` says whether u(a, b) == u(b, a) for every pair (the matrix is then exactly
    symmetric). Subclasses override ``_features`` (per-text preprocessing; texts with equal
    features are scored once) and ``_matrix`` (the matrix of distinct features).
    """

    name: ClassVar[str] = "utility"
    symmetric: ClassVar[bool] = False

    def _features(self, text: str) -> object:
        return text

    def _matrix(self, features: list) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def matrix(self, texts: Sequence[str]) -> np.ndarray:
        """u[i, j] = u(texts[i], texts[j]) for all pairs, float64 of shape (N, N)."""
        distinct, inverse = unique_texts(texts)
        keys: dict[object, int] = {}
        features = []
        remap = np.empty(len(distinct), dtype=np.int64)
        for i, text in enumerate(distinct):
            feature = self._features(text)
            j = keys.setdefault(feature, len(keys))
            if j == len(features):
                features.append(feature)
            remap[i] = j
        inner = self._matrix(features) if features else np.zeros((0, 0))
        full = remap[inverse]
        return inner[np.ix_(full, full)]

    def __call__(self, hypothesis: str, reference: str) -> float:
        return float(self.matrix([hypothesis, reference])[0, 1])

    def hypothesis_keys(self, texts: Sequence[str]) -> list[Hashable]:
        """Identity of each text as a hypothesis (for the ``model`` method): the text itself."""
        return list(texts)

    def __repr__(self) -> str:
        config = getattr(self, "config", None)
        return f"{type(self).__name__}({config!r})" if config is not None else type(self).__name__


class CallableUtility(Utility):
    """Any Python callable (hypothesis, reference) -> float, called once per distinct pair."""

    def __init__(self, fn: Callable[[str, str], float], name: str | None = None):
        self.fn = fn
        self.label = name or getattr(fn, "__name__", None) or type(fn).__name__

    def _matrix(self, features: list) -> np.ndarray:
        k = len(features)
        out = np.empty((k, k), dtype=np.float64)
        for i, a in enumerate(features):
            for j, b in enumerate(features):
                out[i, j] = float(self.fn(a, b))
        return out

    def __call__(self, hypothesis: str, reference: str) -> float:
        return float(self.fn(hypothesis, reference))

    def __repr__(self) -> str:
        return f"CallableUtility({self.label})"


class AnswerUtility(Utility):
    """u(a, b) = 1 if the normalised final answers of a and b are equal, else 0.

    Texts without an extractable answer (``extract_answer`` gives None) agree with nothing,
    themselves and each other included: u = 0.
    """

    name = "answer"
    symmetric = True

    def __init__(self, extract: Callable[[str], str | None] = cached_extract_answer):
        self.extract = extract

    def _features(self, text: str) -> object:
        return self.extract(text)

    def hypothesis_keys(self, texts: Sequence[str]) -> list[Hashable]:
        """Texts with the same final answer are one hypothesis; answerless texts stay distinct."""
        keys: list[Hashable] = []
        for text in texts:
            answer = self.extract(text)
            keys.append(("answer", answer) if answer is not None else ("text", text))
        return keys

    def _matrix(self, features: list) -> np.ndarray:
        ids = np.array([-1 if f is None else i for i, f in enumerate(features)])
        # features are distinct, so equal answers only on the diagonal (None excluded)
        out = np.zeros((len(features), len(features)))
        out[np.diag_indices_from(out)] = (ids >= 0).astype(np.float64)
        return out


_PUNCT_TABLE = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def squad_normalize(text: str) -> str:
    """SQuAD's answer normalisation: lower case, drop punctuation and articles, fix whitespace."""
    text = text.lower().translate(_PUNCT_TABLE)
    return " ".join(_ARTICLES.sub(" ", text).split())


@dataclass(frozen=True)
class TokenF1Config:
    """Options of ``TokenF1`` (none yet beyond SQuAD's definition)."""


class TokenF1(Utility):
    """SQuAD token F1 (the official v2.0 evaluation script's ``compute_f1``).

    Tokens: ``squad_normalize(text).split()``. With common = multiset intersection,
    P = |common| / |hyp|, R = |common| / |ref|, F1 = 2PR / (P + R); 0 when nothing is in common.
    As in SQuAD v2.0, if either side has no tokens, u = 1 when both have none, else 0.
    Symmetric.
    """

    name = "token_f1"
    symmetric = True

    def __init__(self, config: TokenF1Config | None = None):
        self.config = config or TokenF1Config()

    def _features(self, text: str) -> object:
        return tuple(squad_normalize(text).split())

    def _matrix(self, features: list) -> np.ndarray:
        vocab: dict[str, int] = {}
        seqs = [
            np.array([vocab.setdefault(t, len(vocab)) for t in f], dtype=np.int64) for f in features
        ]
        ((doc, gid),) = _ngrams.ngram_ids(seqs, 1)
        common = _ngrams.clipped_matches(doc, gid, len(seqs))
        n = np.array([len(f) for f in features], dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            precision = common / n[:, None]
            recall = common / n[None, :]
            f1 = (2 * precision * recall) / (precision + recall)
        f1 = np.where(common > 0, f1, 0.0)
        empty = n == 0
        either = empty[:, None] | empty[None, :]
        both = empty[:, None] & empty[None, :]
        return np.where(either, both.astype(np.float64), f1)


def _as_utility(name: str, entry: object) -> Utility:
    return entry if isinstance(entry, Utility) else CallableUtility(entry, name)


UTILITIES: Registry[Utility] = Registry("utility", _as_utility)


def register_utility(name: str, utility: Utility | Callable[[str, str], float] | None = None):
    """Register a utility under ``name`` (a name already taken is an error). Usable as a class
    decorator:

    ``@register_utility("mine")`` on a ``Utility`` subclass registers an instance of it.
    """
    if utility is not None:
        return UTILITIES.register(name, utility)

    def decorate(cls):
        UTILITIES.register(name, cls())
        return cls

    return decorate


def get_utility(utility: str | Utility | Callable[[str, str], float]) -> tuple[str, Utility]:
    """(name, instance) for a registry name, a ``Utility`` or a plain callable.

    Raises ValueError listing the valid names for an unknown name.
    """
    if isinstance(utility, str):
        return utility, UTILITIES.resolve(utility)
    if isinstance(utility, Utility):
        return getattr(utility, "label", None) or utility.name, utility
    if callable(utility):
        wrapped = CallableUtility(utility)
        return wrapped.label, wrapped
    raise TypeError(
        f"utility must be a name, a Utility or a callable, not {type(utility).__name__}"
    )


UTILITIES.register("answer", AnswerUtility())
UTILITIES.register("token_f1", TokenF1())
