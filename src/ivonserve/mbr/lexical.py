"""chrF, sentence BLEU and ROUGE-L as vectorised utilities (numpy only, no sacrebleu/rouge-score).

Each equals its reference implementation to floating-point rounding (tests/test_mbr_parity.py):

* ``chrf``  == ``sacrebleu.sentence_chrf(hyp, [ref]).score / 100`` (sacrebleu 2.x defaults);
* ``bleu``  == ``sacrebleu.sentence_bleu(hyp, [ref]).score / 100`` (13a tokens, exp smoothing,
  effective order);
* ``rouge_l`` == ``RougeScorer(["rougeL"]).score(target=ref, prediction=hyp)["rougeL"].fmeasure``.

u(y_i, y_j) always scores y_i as the hypothesis against y_j as the reference. chrF and BLEU are
asymmetric (u(a, b) != u(b, a) in general); ROUGE-L's F-measure is symmetric.

Statistics are built once per distinct text and all pairs come out of matrix products
(``_ngrams.clipped_matches``) or one bit-parallel LCS pass per text (``_ngrams.pair_lcs``);
the per-pair formulas are then evaluated on whole (N, N) arrays.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from . import _ngrams
from .utilities import UTILITIES, Utility

__all__ = [
    "BLEU",
    "BLEUConfig",
    "ChrF",
    "ChrFConfig",
    "RougeL",
    "RougeLConfig",
    "rouge_tokenize",
    "tokenize_13a",
]


def _vocab_ids(sequences: list[tuple[str, ...]]) -> list[np.ndarray]:
    vocab: dict[str, int] = {}
    return [
        np.fromiter((vocab.setdefault(tok, len(vocab)) for tok in seq), np.int64, len(seq))
        for seq in sequences
    ]


# ---------------------------------------------------------------------------------- chrF
_PUNCTS = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")


def _chrf_words(sent: str) -> tuple[str, ...]:
    """sacrebleu's CHRF._remove_punctuation: split off one leading or trailing punctuation mark."""
    words: list[str] = []
    for w in sent.split():
        if len(w) == 1:
            words.append(w)
        elif w[-1] in _PUNCTS:
            words += [w[:-1], w[-1]]
        elif w[0] in _PUNCTS:
            words += [w[0], w[1:]]
        else:
            words.append(w)
    return tuple(words)


@dataclass(frozen=True)
class ChrFConfig:
    """sacrebleu CHRF options (defaults = sacrebleu's: chrF2, char order 6, no word n-grams)."""

    char_order: int = 6
    word_order: int = 0
    beta: int = 2
    lowercase: bool = False
    whitespace: bool = False


class ChrF(Utility):
    """chrF (Popovic 2015) as sacrebleu computes it, divided by 100.

    For each order n (char n-grams 1..char_order, then word n-grams 1..word_order), with
    c_y(g) the count of n-gram g in y: match_n = sum_g min(c_hyp(g), c_ref(g)),
    P_n = match_n / |hyp n-grams|, R_n = match_n / |ref n-grams|. Only orders where both sides
    have n-grams count ("effective order" E): P = mean P_n, R = mean R_n over them, and
    u = (1 + beta^2) P R / (beta^2 P + R), 0 when P + R = 0. Characters are taken with all
    whitespace removed. Asymmetric: u(a, b) scores a as hypothesis against reference b.
    """

    name = "chrf"
    symmetric = False

    def __init__(self, config: ChrFConfig | None = None):
        self.config = config or ChrFConfig()

    def _features(self, text: str) -> object:
        cfg = self.config
        sent = text.lower() if cfg.lowercase else text
        chars = sent if cfg.whitespace else "".join(sent.split())
        words = _chrf_words(sent) if cfg.word_order > 0 else ()
        return chars, words

    def _matrix(self, features: list) -> np.ndarray:
        cfg = self.config
        k = len(features)
        orders = _ngrams.ngram_ids([_ngrams.symbols(c) for c, _ in features], cfg.char_order)
        if cfg.word_order > 0:
            orders += _ngrams.ngram_ids(_vocab_ids([w for _, w in features]), cfg.word_order)
        factor = cfg.beta**2
        avg_prec = np.zeros((k, k))
        avg_rec = np.zeros((k, k))
        effective = np.zeros((k, k), dtype=np.int64)
        for doc, gid in orders:
            match = _ngrams.clipped_matches(doc, gid, k)
            count = np.diag(match).copy()
            hyp = count[:, None]
            ref = count[None, :]
            valid = (hyp > 0) & (ref > 0)
            with np.errstate(divide="ignore", invalid="ignore"):
                avg_prec += np.where(valid, match / hyp, 0.0)
                avg_rec += np.where(valid, match / ref, 0.0)
            effective += valid
        with np.errstate(divide="ignore", invalid="ignore"):
            avg_prec = np.where(effective > 0, avg_prec / effective, 0.0)
            avg_rec = np.where(effective > 0, avg_rec / effective, 0.0)
            score = (1 + factor) * avg_prec * avg_rec
            score = score / ((factor * avg_prec) + avg_rec)
        return np.where(avg_prec + avg_rec != 0, score, 0.0)


# ---------------------------------------------------------------------------------- BLEU
# sacrebleu's tokenizer_13a / tokenizer_re (mteval-v13a). Rule 1 of tokenizer_re,
# re.sub(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])", r" \1 "), pads each ASCII punctuation mark
# of that class with spaces; done here with str.replace per mark (same result, much faster;
# the space itself, also in the class, is left alone since whitespace is collapsed at the end).
# Rules 2-4 are the original regexes with callables instead of templates (same matches).
_13A_PAD = tuple('!"#$%&()*+/:;<=>?@[\\]^_`{|}~')
_13A_RULES = (
    (re.compile(r"([^0-9])([\.,])"), lambda m: f"{m.group(1)} {m.group(2)} "),
    (re.compile(r"([\.,])([^0-9])"), lambda m: f" {m.group(1)} {m.group(2)}"),
    (re.compile(r"([0-9])(-)"), lambda m: f"{m.group(1)} {m.group(2)} "),
)


def tokenize_13a(line: str) -> str:
    """The mteval-v13a tokenisation that sacrebleu applies before BLEU (its default, '13a')."""
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        line = line.replace("&quot;", '"').replace("&amp;", "&")
        line = line.replace("&lt;", "<").replace("&gt;", ">")
    line = f" {line} "
    for mark in _13A_PAD:
        if mark in line:
            line = line.replace(mark, f" {mark} ")
    for pattern, repl in _13A_RULES:
        line = pattern.sub(repl, line)
    return " ".join(line.split())


_TOKENIZERS = {"13a": tokenize_13a, "none": lambda line: line}
_SMOOTH_DEFAULTS = {"none": None, "floor": 0.1, "add-k": 1, "exp": None}


@dataclass(frozen=True)
class BLEUConfig:
    """sacrebleu BLEU options; defaults = ``sentence_bleu``'s (exp smoothing, effective order)."""

    max_ngram_order: int = 4
    smooth_method: str = "exp"
    smooth_value: float | None = None
    lowercase: bool = False
    tokenize: str = "13a"
    effective_order: bool = True

    def __post_init__(self) -> None:
        if self.smooth_method not in _SMOOTH_DEFAULTS:
            raise ValueError(
                f"unknown smooth_method {self.smooth_method!r}; valid: {sorted(_SMOOTH_DEFAULTS)}"
            )
        if self.tokenize not in _TOKENIZERS:
            raise ValueError(f"unknown tokenize {self.tokenize!r}; valid: {sorted(_TOKENIZERS)}")


def _my_log(p: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(p == 0, -9999999999.0, np.log(np.where(p == 0, 1.0, p)))


class BLEU(Utility):
    """Sentence BLEU as ``sacrebleu.sentence_bleu`` computes it, divided by 100.

    Tokens: 13a. For n = 1..4: correct_n = clipped n-gram matches, total_n = |hyp n-grams|.
    Orders run while total_n > 0 (effective order E = the last such n). exp smoothing (NIST):
    p_n = correct_n / total_n, or 1 / (2^k total_n) for the k-th order with no match.
    BP = exp(1 - |ref| / |hyp|) if |hyp| < |ref| (0 for an empty hyp), else 1.
    u = BP * exp(mean_{n <= E} log p_n); 0 when no n-gram matches at all.
    Asymmetric: u(a, b) scores a as hypothesis against reference b.
    """

    name = "bleu"
    symmetric = False

    def __init__(self, config: BLEUConfig | None = None):
        self.config = config or BLEUConfig()

    def _features(self, text: str) -> object:
        cfg = self.config
        sent = text.lower() if cfg.lowercase else text
        return tuple(_TOKENIZERS[cfg.tokenize](sent.rstrip()).split())

    def _matrix(self, features: list) -> np.ndarray:
        cfg = self.config
        k = len(features)
        order = cfg.max_ngram_order
        smooth_value = cfg.smooth_value
        if smooth_value is None:
            smooth_value = _SMOOTH_DEFAULTS[cfg.smooth_method]
        lengths = np.array([len(f) for f in features], dtype=np.float64)
        sys_len = lengths[:, None]
        ref_len = lengths[None, :]
        shape = (k, k)
        correct = [
            _ngrams.clipped_matches(doc, gid, k)
            for doc, gid in _ngrams.ngram_ids(_vocab_ids(features), order)
        ]
        any_correct = np.zeros(shape, dtype=bool)
        for c in correct:
            any_correct |= c > 0
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            bp = np.where(
                sys_len < ref_len,
                np.where(sys_len > 0, np.exp(1 - ref_len / sys_len), 0.0),
                1.0,
            )
            alive = np.ones(shape, dtype=bool)
            smooth = np.ones(shape)
            eff = np.full(shape, order, dtype=np.int64)
            precisions = []
            for n in range(1, order + 1):
                corr = correct[n - 1]
                tot = np.broadcast_to(np.maximum(sys_len - n + 1, 0.0), shape)
                if cfg.smooth_method == "add-k" and n > 1:
                    corr = corr + smooth_value
                    tot = tot + smooth_value
                alive = alive & (tot != 0)
                if cfg.effective_order:
                    eff = np.where(alive, n, eff)
                zero = corr == 0
                p = 100.0 * corr / tot
                if cfg.smooth_method == "exp":
                    smooth = np.where(alive & zero, smooth * 2, smooth)
                    p = np.where(zero, 100.0 / (smooth * tot), p)
                elif cfg.smooth_method == "floor":
                    p = np.where(zero, 100.0 * smooth_value / tot, p)
                else:
                    p = np.where(zero, 0.0, p)
                precisions.append(np.where(alive, p, 0.0))
            log_sum = np.zeros(shape)
            for n, p in enumerate(precisions, start=1):
                log_sum = log_sum + np.where(n <= eff, _my_log(p), 0.0)
            score = bp * np.exp(log_sum / eff)
        # exp(log 100) / 100 can exceed 1 by an ulp (sacrebleu gives 100.00000000000004 too)
        return np.minimum(np.where(any_correct, score, 0.0) / 100.0, 1.0)


# ---------------------------------------------------------------------------------- ROUGE-L
_NON_ALPHANUM_RE = re.compile(r"[^a-z0-9]+")


def rouge_tokenize(text: str) -> list[str]:
    r"""rouge-score's default tokenizer without stemming: lower case, [a-z0-9]+ runs only.

    (rouge-score then splits on r"\s+" and keeps tokens matching ^[a-z0-9]+$; after the
    substitution that is exactly the non-empty pieces, i.e. str.split().)
    """
    return _NON_ALPHANUM_RE.sub(" ", text.lower()).split()


@dataclass(frozen=True)
class RougeLConfig:
    """rouge-score ``RougeScorer(["rougeL"])`` options (only the default: no stemming)."""


class RougeL(Utility):
    """ROUGE-L F-measure as rouge-score computes it.

    Tokens: ``rouge_tokenize``. L = |LCS(hyp, ref)|, P = L / |hyp|, R = L / |ref|,
    u = 2PR / (P + R) (0 when P + R = 0); u = 0 when either side has no tokens (so
    u(y, y) = 0 for a text without tokens, as in rouge-score). Symmetric.
    """

    name = "rouge_l"
    symmetric = True

    def __init__(self, config: RougeLConfig | None = None):
        self.config = config or RougeLConfig()

    def _features(self, text: str) -> object:
        return tuple(rouge_tokenize(text))

    def _matrix(self, features: list) -> np.ndarray:
        seqs = [s.tolist() for s in _vocab_ids(features)]
        lcs = _ngrams.pair_lcs(seqs).astype(np.float64)
        n = np.array([len(f) for f in features], dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            precision = lcs / n[:, None]
            recall = lcs / n[None, :]
            f = 2 * precision * recall / (precision + recall)
        f = np.where(precision + recall > 0, f, 0.0)
        empty = n == 0
        return np.where(empty[:, None] | empty[None, :], 0.0, f)


UTILITIES.register("chrf", ChrF())
UTILITIES.register("bleu", BLEU())
UTILITIES.register("rouge_l", RougeL())
