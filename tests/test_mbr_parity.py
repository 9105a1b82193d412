"""Exactness: every lexical utility equals its reference implementation within 1e-9.

References (test-only dependencies): sacrebleu (chrF, sentence BLEU, the 13a tokenizer),
rouge-score (ROUGE-L F-measure, its tokenizer), and the official SQuAD v2.0 ``compute_f1``.
"""

from __future__ import annotations

import collections
import random
import re
import string
import subprocess
import sys

import numpy as np
import pytest

sacrebleu = pytest.importorskip("sacrebleu")
rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
rouge_tokenize_ref = pytest.importorskip("rouge_score.tokenize")

from sacrebleu.metrics import BLEU as RefBLEU  # noqa: E402
from sacrebleu.metrics import CHRF as RefCHRF  # noqa: E402
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a  # noqa: E402

from ivonserve.mbr import BLEU, UTILITIES, BLEUConfig, ChrF, ChrFConfig  # noqa: E402
from ivonserve.mbr.lexical import rouge_tokenize, tokenize_13a  # noqa: E402

TOL = 1e-9
SCORER = rouge_scorer.RougeScorer(["rougeL"])


# ------------------------------------------------------------------ reference SQuAD v2.0 F1
def _squad_normalize(s):
    def remove_articles(text):
        return re.sub(re.compile(r"\b(a|an|the)\b", re.UNICODE), " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def _squad_tokens(s):
    return _squad_normalize(s).split() if s else []


def squad_f1(a_gold, a_pred):
    gold_toks, pred_toks = _squad_tokens(a_gold), _squad_tokens(a_pred)
    common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
    num_same = sum(common.values())
    if len(gold_toks) == 0 or len(pred_toks) == 0:
        return int(gold_toks == pred_toks)
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(pred_toks)
    recall = 1.0 * num_same / len(gold_toks)
    return (2 * precision * recall) / (precision + recall)


REFERENCE = {
    # u(hypothesis, reference)
    "chrf": lambda h, r: sacrebleu.sentence_chrf(h, [r]).score / 100,
    "bleu": lambda h, r: sacrebleu.sentence_bleu(h, [r]).score / 100,
    "rouge_l": lambda h, r: SCORER.score(r, h)["rougeL"].fmeasure,
    "token_f1": lambda h, r: float(squad_f1(r, h)),
}


# ------------------------------------------------------------------ varied texts
WORDS = (  # noqa: SIM905
    "the a an cat sat on mat dog ran 12 1,234.5 -3 2/3 $18.00 50% The Answer is answer: #### "
    "naïve café İstanbul straße ΑΒΓ δέλτα 日本語 テキスト 🙂 👍🏽 K Å ǅ ﬁ e\u0301 "
    "it's don't (hi) [x] {y} <b> &amp; &quot; &lt; &gt; -- ... , . ; ! ? ' \" / \\ @ # ^ _ ` | ~ "
    "3.14 3,14 1.5e3 x-ray 5-3 -5 <skipped> co-operate"
).split()
GSM = (  # noqa: SIM905
    "Natalia sold 48/2 = 24 clips in May. Natalia sold 48+24 = 72 clips altogether in April "
    "and May. Weng earns 12/60 = $0.2 per minute. Working 50 minutes, she earned 0.2 x 50 = $10. "
    "In the beginning, Betty has only 100 / 2 = $50. Betty's grandparents gave her 15 * 2 = $30. "
    "This means, Betty needs 100 - 50 - 30 - 15 = $5 more. The answer is 5."
).split()


def make_texts(rng: random.Random, n: int) -> list[str]:
    texts = [
        "",
        " ",
        "\n\t",
        "a",
        "the the the the the",
        "12",
        "1,234",
        "The cat sat on the mat.",
        "The cat sat on the mat.",
        "the cat sat on the mat",
        "e\u0301\u0301",
        "🙂🙂🙂",
        "x-\ny &amp; <skipped> z",
        "A.B,C 1.2,3 4-5 a-b",
        "...",
        "  leading and trailing  ",
    ]
    while len(texts) < n:
        kind = rng.random()
        if kind < 0.3:
            k = rng.randint(1, 12)
            words = [rng.choice(WORDS) for _ in range(k)]
        elif kind < 0.6:  # GSM8k-like, perturbed
            start = rng.randrange(len(GSM) - 20)
            words = GSM[start : start + rng.randint(10, 60)]
            words = [w if rng.random() > 0.1 else rng.choice(WORDS) for w in words]
        elif kind < 0.75:  # repeated words
            w = rng.choice(WORDS)
            words = [w] * rng.randint(2, 30)
        elif kind < 0.85:  # long
            words = [rng.choice(GSM + WORDS) for _ in range(rng.randint(120, 250))]
        else:  # characters
            words = ["".join(rng.choice("ab1 .,-\n") for _ in range(rng.randint(1, 15)))]
        sep = rng.choice([" ", " ", "\n", "  ", "\t", ""])
        texts.append(sep.join(words))
    return texts[:n]


POOL = make_texts(random.Random(0), 26)


def ref_matrix(fn, texts):
    return np.array([[fn(a, b) for b in texts] for a in texts])


@pytest.mark.parametrize("name", ["chrf", "bleu", "rouge_l", "token_f1"])
def test_matrix_equals_reference(name):
    got = UTILITIES[name].matrix(POOL)
    want = ref_matrix(REFERENCE[name], POOL)
    assert np.abs(got - want).max() < TOL
    if UTILITIES[name].symmetric:
        assert np.array_equal(got, got.T)
    assert got.min() >= 0 and got.max() <= 1


@pytest.mark.parametrize("name", ["chrf", "bleu", "rouge_l", "token_f1"])
def test_random_pairs_equal_reference(name):
    rng = random.Random(hash(name) % 1000)
    texts = make_texts(rng, 60)
    utility = UTILITIES[name]
    n_pairs = 0
    for _ in range(120):
        a, b = rng.choice(texts), rng.choice(texts)
        if rng.random() < 0.2:  # near-duplicates
            b = a.replace(" ", "  ", 1) if rng.random() < 0.5 else a[: len(a) // 2]
        assert abs(utility(a, b) - REFERENCE[name](a, b)) < TOL, (a, b)
        n_pairs += 1
    assert n_pairs == 120


def test_chrf_and_bleu_are_asymmetric():
    a, b = "the cat sat on the mat today", "the cat"
    for name in ("chrf", "bleu"):
        m = UTILITIES[name].matrix([a, b])
        assert m[0, 1] != m[1, 0]
        assert m[0, 1] == pytest.approx(REFERENCE[name](a, b))
        assert m[1, 0] == pytest.approx(REFERENCE[name](b, a))


@pytest.mark.parametrize(
    "config",
    [
        ChrFConfig(word_order=2),
        ChrFConfig(lowercase=True),
        ChrFConfig(whitespace=True, char_order=4, beta=1),
    ],
)
def test_chrf_options_equal_sacrebleu(config):
    ref = RefCHRF(
        char_order=config.char_order,
        word_order=config.word_order,
        beta=config.beta,
        lowercase=config.lowercase,
        whitespace=config.whitespace,
    )
    texts = POOL[:14]
    got = ChrF(config).matrix(texts)
    want = ref_matrix(lambda h, r: ref.sentence_score(h, [r]).score / 100, texts)
    assert np.abs(got - want).max() < TOL


@pytest.mark.parametrize(
    "config",
    [
        BLEUConfig(smooth_method="floor"),
        BLEUConfig(smooth_method="add-k"),
        BLEUConfig(smooth_method="none"),
        BLEUConfig(effective_order=False),
        BLEUConfig(lowercase=True, tokenize="none", max_ngram_order=3),
    ],
)
def test_bleu_options_equal_sacrebleu(config):
    ref = RefBLEU(
        max_ngram_order=config.max_ngram_order,
        smooth_method=config.smooth_method,
        smooth_value=config.smooth_value,
        lowercase=config.lowercase,
        tokenize=config.tokenize,
        effective_order=config.effective_order,
    )
    texts = POOL[:14]
    got = BLEU(config).matrix(texts)
    want = ref_matrix(lambda h, r: ref.sentence_score(h, [r]).score / 100, texts)
    assert np.abs(got - want).max() < TOL


def test_tokenize_13a_equals_sacrebleu_on_fuzz():
    ref = Tokenizer13a()
    rng = random.Random(5)
    alphabet = "ab1 2.,-\n&;<>/:x()$%'\"{}[]~`@^_|é日\t"
    strings = [*POOL, "&quot;&amp;&lt;&gt;", "a-\nb", "<skipped>x", "1.2.3,4,5-6-a"]
    strings += [
        "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 25))) for _ in range(3000)
    ]
    for s in strings:
        assert tokenize_13a(s) == ref(s), repr(s)


def test_rouge_tokenizer_equals_rouge_score():
    for s in [*POOL, "İstanbul KELVIN \u212a", "Straße ǅ"]:
        assert rouge_tokenize(s) == rouge_tokenize_ref.tokenize(s, None), repr(s)


def test_runtime_imports_no_reference_library():
    code = (
        "import sys, ivonserve.mbr, ivonserve.answers;"
        "from ivonserve.mbr import select, Candidate;"
        "select([Candidate(0, 'a 1'), Candidate(1, 'b 1')], utility='chrf');"
        "bad = [m for m in ('sacrebleu', 'rouge_score', 'torch', 'nltk', 'scipy')"
        " if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
