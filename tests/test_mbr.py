"""Selection methods, confidence, ties, errors and the vectorised kernels of ivonserve.mbr."""

from __future__ import annotations

import math
import random
from collections import Counter

import numpy as np
import pytest

from ivonserve.mbr import (
    METHODS,
    UTILITIES,
    Candidate,
    Flat,
    MethodConfig,
    Utility,
    _ngrams,
    get_utility,
    register_method,
    register_utility,
    select,
)


def table_utility(table: dict[tuple[str, str], float]):
    """A symmetric callable utility from a hand-written table; u(x, x) = 1."""

    def u(a: str, b: str) -> float:
        if a == b:
            return 1.0
        return table.get((a, b), table.get((b, a)))

    return u


def cands(*draws: list[str], logprobs=None, tokens=None) -> list[Candidate]:
    out = []
    for m, texts in enumerate(draws):
        for t in texts:
            i = len(out)
            lp = None if logprobs is None else logprobs[i]
            tk = None if tokens is None else tokens[i]
            out.append(Candidate(draw=m, text=t, logprob=lp, tokens=tk))
    return out


# ------------------------------------------------------------------ flat vs model, by hand
SOFT = table_utility(
    {
        ("A", "B"): 0.9,
        ("A", "C"): 0.6,
        ("A", "D"): 0.0,
        ("B", "C"): 0.6,
        ("B", "D"): 0.0,
        ("C", "D"): 0.6,
    }
)


def test_flat_and_model_differ_with_soft_utility():
    # draw 0: A, B   draw 1: C, D     (all texts distinct)
    # flat (mean over all 4, self included):
    #   A: (1 + .9 + .6 + 0) / 4 = .625    B: (.9 + 1 + .6 + 0) / 4 = .625
    #   C: (.6 + .6 + 1 + .6) / 4 = .7     D: (0 + 0 + .6 + 1) / 4 = .4     -> C
    # model (each text scored by its own draw only):
    #   A: s_0(A) = (1 + .9) / 2 = .95     B: s_0(B) = (.9 + 1) / 2 = .95
    #   C: s_1(C) = (1 + .6) / 2 = .8      D: s_1(D) = (.6 + 1) / 2 = .8    -> A (tie A/B: index)
    cs = cands(["A", "B"], ["C", "D"])
    flat = select(cs, method="flat", utility=SOFT)
    model = select(cs, method="model", utility=SOFT)
    assert flat.index == 2 and flat.text == "C"
    assert flat.scores == pytest.approx([0.625, 0.625, 0.7, 0.4])
    assert flat.confidence == pytest.approx(0.7)
    assert model.index == 0 and model.text == "A"
    assert model.scores == pytest.approx([0.95, 0.95, 0.8, 0.8])
    # confidence: mean over draws of s_m(A) = (s_0(A) + s_1(A)) / 2 = (.95 + (.6 + 0) / 2) / 2
    assert model.confidence == pytest.approx((0.95 + 0.3) / 2)


def test_model_sums_over_the_draws_that_produced_a_text():
    # draw 0: A, B   draw 1: A, C   draw 2: D, C
    # s_0: A (1+.9)/2=.95  B (.9+1)/2=.95
    # s_1: A (1+.6)/2=.8   C (.6+1)/2=.8
    # s_2: D (1+.6)/2=.8   C (.6+1)/2=.8
    # model: A = s_0(A) + s_1(A) = 1.75; B = .95; C = s_1(C) + s_2(C) = 1.6; D = .8   -> A
    # flat:  A: (1+.9+1+.6+0+.6)/6 = 4.1/6;  C: (.6+.6+.6+1+.6+1)/6 = 4.4/6  -> C
    cs = cands(["A", "B"], ["A", "C"], ["D", "C"])
    model = select(cs, method="model", utility=SOFT)
    assert model.scores == pytest.approx([1.75, 0.95, 1.75, 1.6, 0.8, 1.6])
    assert model.index == 0
    flat = select(cs, method="flat", utility=SOFT)
    assert flat.text == "C" and flat.index == 3
    assert flat.scores[3] == pytest.approx(4.4 / 6)
    assert flat.scores[0] == pytest.approx(4.1 / 6)


def test_flat_and_model_differ_with_unequal_counts():
    # draw 0 sampled once ("1"), draw 1 three times ("2", "2", "3"); answer utility.
    # flat: share of the pool: "1" 1/4, "2" 2/4, "3" 1/4          -> "2" (candidate 1)
    # model: s_0("1") = 1/1 = 1;  s_1("2") = 2/3;  s_1("3") = 1/3   -> "1" (candidate 0)
    cs = cands(["#### 1"], ["#### 2", "#### 2", "#### 3"])
    flat = select(cs, method="flat")
    model = select(cs, method="model")
    assert (flat.index, flat.answer) == (1, "2")
    assert flat.scores == pytest.approx([0.25, 0.5, 0.5, 0.25])
    assert flat.confidence == pytest.approx(0.5)
    assert (model.index, model.answer) == (0, "1")
    assert model.scores == pytest.approx([1.0, 2 / 3, 2 / 3, 1 / 3])
    # confidence: draw-balanced share of "1": (1/1 + 0/3) / 2
    assert model.confidence == pytest.approx(0.5)


def test_model_with_answer_utility_pools_a_final_answer_across_draws():
    # the texts all differ, but to the answer utility texts with one final answer are one
    # hypothesis: draw 0: 1, 2   draw 1: 1, 2   draw 2: 2, 3   (S = 2)
    # s_m(answer) = share of draw m:  s_0(1) = s_0(2) = s_1(1) = s_1(2) = s_2(2) = s_2(3) = .5
    # model: "1" = .5 + .5 = 1.0; "2" = .5 + .5 + .5 = 1.5; "3" = .5       -> "2"
    # (= M * flat: flat shares are 2/6, 3/6, 1/6.) Keyed by text, every score would be .5.
    cs = cands(
        ["So 1 + 0 = 1. The answer is 1.", "We get 2. #### 2"],
        ["Answer: 1", "1 + 1 = 2, the answer is 2."],
        ["\\boxed{2}", "#### 3"],
    )
    model = select(cs, method="model")
    assert model.answer == "2" and model.index == 1
    assert model.scores == pytest.approx([1.0, 1.5, 1.0, 1.5, 1.5, 0.5])
    flat = select(cs, method="flat")
    assert flat.answer == "2"
    assert np.allclose(np.array(model.scores) / 3, flat.scores)
    # confidence: (s_0("2") + s_1("2") + s_2("2")) / 3 = .5 = flat share 3/6
    assert model.confidence == pytest.approx(0.5) == flat.confidence


def test_flat_and_model_agree_for_exact_match_with_equal_counts():
    rng = random.Random(1)
    forms = ["#### {}", "The answer is {}.", "So we get {} in total. #### {}", "Answer: {}"]
    for _ in range(100):
        m, s = rng.randint(1, 5), rng.randint(1, 6)
        draws = []
        for _ in range(m):
            values = [rng.randint(0, 3) for _ in range(s)]
            draws.append([rng.choice(forms).format(v, v) for v in values])
        cs = cands(*draws)
        flat = select(cs, method="flat")
        model = select(cs, method="model")
        assert flat.answer == model.answer
        # model score = total count / S, flat score = total count / (M S)
        assert np.allclose(np.array(model.scores) / m, flat.scores)
        assert model.confidence == pytest.approx(flat.confidence)


# ------------------------------------------------------------------ weighted variants
def lp(q: float, tokens: int) -> float:
    """A logprob whose length-normalised probability exp(logprob / tokens) is q."""
    return tokens * math.log(q)


def test_majority_weighted_by_length_normalised_probability():
    # answers A, B, B with q = .6, .2, .2 (tokens differ: the weights are per token)
    # unweighted vote: B 2/3 -> B.   weighted: A .6, B .4 -> A, confidence .6
    tokens = [10, 20, 5]
    cs = cands(
        ["#### 7", "#### 8", "#### 8"],
        logprobs=[lp(0.6, 10), lp(0.2, 20), lp(0.2, 5)],
        tokens=tokens,
    )
    assert select(cs, method="majority").answer == "8"
    weighted = select(cs, method="majority_weighted")
    assert weighted.answer == "7"
    assert weighted.confidence == pytest.approx(0.6)
    assert weighted.scores == pytest.approx([0.6, 0.4, 0.4])
    flat_w = select(cs, method="flat_weighted", utility="answer")
    assert flat_w.scores == pytest.approx(weighted.scores)


def test_model_weighted_normalises_within_each_draw():
    # draw 0: A (q .9), B (q .1)     draw 1: B (q .5), C (q .5)     answer utility
    # weighted: s_0(A) = .9, s_0(B) = .1, s_1(B) = .5, s_1(C) = .5
    #   A = .9, B = .1 + .5 = .6, C = .5                 -> A; confidence (.9 + 0) / 2 = .45
    # unweighted: s_0 = .5 each, s_1 = .5 each: A .5, B 1.0, C .5 -> B
    texts = (["#### 1", "#### 2"], ["#### 2", "#### 3"])
    qs = [0.9, 0.1, 0.5, 0.5]
    cs = cands(*texts, logprobs=[lp(q, 4) for q in qs], tokens=[4, 4, 4, 4])
    weighted = select(cs, method="model_weighted")
    assert weighted.answer == "1"
    assert weighted.scores == pytest.approx([0.9, 0.6, 0.6, 0.5])
    assert weighted.confidence == pytest.approx(0.45)
    assert select(cs, method="model").answer == "2"


def test_weighted_without_tokens_uses_raw_sequence_probability():
    cs = cands(["#### 1", "#### 2", "#### 2"], logprobs=[math.log(0.5), math.log(0.2), -5.0])
    res = select(cs, method="flat_weighted")
    q = np.array([0.5, 0.2, math.exp(-5.0)])
    w = q / q.sum()
    assert res.answer == "1"
    assert res.scores == pytest.approx([w[0], w[1] + w[2], w[1] + w[2]])


def test_weighted_is_stable_for_very_negative_logprobs():
    cs = cands(["#### 1", "#### 2"], logprobs=[-5000.0, -5001.0], tokens=[1, 1])
    res = select(cs, method="flat_weighted")
    assert res.answer == "1"
    assert res.confidence == pytest.approx(1 / (1 + math.exp(-1)))


@pytest.mark.parametrize("method", ["flat_weighted", "model_weighted", "majority_weighted"])
def test_weighted_needs_logprobs(method):
    cs = [Candidate(0, "#### 1", -1.0, 3), Candidate(0, "#### 2", None, 3)]
    with pytest.raises(ValueError, match="logprob"):
        select(cs, method=method)
    with pytest.raises(ValueError, match="logprob"):
        select(cs[1:], method=method)  # also for a single candidate


def test_weighted_rejects_partial_tokens_and_nan():
    with pytest.raises(ValueError, match="tokens"):
        select([Candidate(0, "#### 1", -1.0, 3), Candidate(0, "#### 2", -1.0)], "flat_weighted")
    with pytest.raises(ValueError, match="non-finite"):
        select(
            [Candidate(0, "#### 1", float("nan"), 3), Candidate(0, "#### 2", -1.0, 3)],
            "flat_weighted",
        )


# ------------------------------------------------------------------ ties
def test_tie_goes_to_highest_mean_logprob():
    # two answers with one vote each; candidate 1 has the lower total logprob (-12 vs -10)
    # but the higher per-token mean (-12/24 = -.5 > -10/10 = -1): it wins.
    cs = cands(["#### 1", "#### 2"], logprobs=[-10.0, -12.0], tokens=[10, 24])
    res = select(cs, method="flat")
    assert res.scores[0] == res.scores[1]
    assert res.index == 1


def test_tie_goes_to_lowest_index_when_logprobs_tie_or_are_missing():
    # means: -10/5 = -2, -2/2 = -1, -2/2 = -1: candidates 1 and 2 tie on logprob too -> 1
    cs = cands(["#### 1", "#### 2", "#### 3"], logprobs=[-10.0, -2.0, -2.0], tokens=[5, 2, 2])
    assert select(cs, method="flat").index == 1
    assert select(cands(["#### 3", "#### 2", "#### 1"]), method="flat").index == 0
    assert select(cands(["#### 3"], ["#### 2"]), method="model").index == 0


def test_tie_candidate_without_logprob_ranks_last():
    cs = [Candidate(0, "#### 1"), Candidate(0, "#### 2", -30.0, 3)]
    assert select(cs, method="flat").index == 1


def test_duplicates_of_the_winner_pick_the_most_likely_copy():
    cs = cands(["#### 4", "#### 4", "#### 5"], logprobs=[-9.0, -3.0, -1.0], tokens=[3, 3, 3])
    res = select(cs, method="model")
    assert res.index == 1 and res.answer == "4"


# ------------------------------------------------------------------ edge cases and errors
def test_empty_candidates():
    with pytest.raises(ValueError, match="at least one candidate"):
        select([])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_single_candidate(method):
    c = Candidate(3, "no number here", -2.0, 4)
    res = select([c], method=method, utility="chrf")
    assert (res.index, res.text, res.answer, res.confidence) == (0, c.text, None, 1.0)
    assert len(res.scores) == 1


def test_no_extractable_answer_anywhere():
    cs = cands(["no idea", "still no idea"], ["nothing"])
    res = select(cs, method="model", utility="answer")
    assert res.answer is None
    assert res.index == 0  # every score is 0 (None agrees with nothing): lowest index
    assert res.scores == (0.0, 0.0, 0.0)
    assert res.confidence == 0.0


def test_none_answers_never_agree():
    # two identical texts without an answer do not vote for each other; "5" wins with 1 vote
    cs = cands(["no idea", "no idea", "#### 5"])
    res = select(cs, method="majority")
    assert res.answer == "5"
    assert res.scores == pytest.approx([0.0, 0.0, 1 / 3])
    assert res.confidence == pytest.approx(1 / 3)
    assert res.answers == (None, None, "5")


def test_winner_without_answer_only_if_nothing_has_one():
    # chrF prefers the answerless text (3 identical copies); require_answer restricts the argmax
    # to the candidates with an answer, require_answer=False does not.
    text = "we cannot solve this problem"
    cs = cands([text, text, text, "the result is 42"])
    res = select(cs, method="flat", utility="chrf")
    assert res.answer == "42" and res.index == 3
    assert max(res.scores) > res.scores[3]
    free = select(cs, method="flat", utility="chrf", require_answer=False)
    assert free.index == 0 and free.answer is None
    assert free.confidence == pytest.approx(free.scores[0])


def test_callable_utility():
    calls = Counter()

    def first_letter(a: str, b: str) -> float:
        calls[(a, b)] += 1
        return float(a[:1] == b[:1])

    cs = cands(["apple 1", "avocado 2", "banana 3", "apple 1"])
    res = select(cs, method="flat", utility=first_letter, require_answer=False)
    assert res.index == 0
    assert res.scores == pytest.approx([0.75, 0.75, 0.25, 0.75])
    assert res.utility == "first_letter"
    assert max(calls.values()) == 1  # duplicate texts scored once
    assert len(calls) == 9  # 3 distinct texts


def test_callable_utility_out_of_range_is_an_error():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        select(cands(["a 1", "b 2"]), utility=lambda a, b: 100.0)


def test_unknown_method_lists_valid_names():
    with pytest.raises(ValueError) as err:
        select(cands(["#### 1"]), method="nope")
    for name in ("flat", "model", "majority", "flat_weighted", "model_weighted"):
        assert name in str(err.value)


def test_unknown_utility_lists_valid_names():
    for method in ("model", "majority"):
        with pytest.raises(ValueError) as err:
            select(cands(["#### 1"]), method=method, utility="meteor")
        for name in ("answer", "chrf", "bleu", "rouge_l", "token_f1"):
            assert name in str(err.value)


def test_not_a_candidate():
    with pytest.raises(TypeError, match="Candidate"):
        select([("0", "text")])


def test_candidate_is_frozen():
    c = Candidate(0, "x")
    with pytest.raises(AttributeError):
        c.text = "y"


# ------------------------------------------------------------------ confidence
def test_confidence_answer_share_and_expected_utility():
    cs = cands(["#### 3", "#### 3", "#### 3", "#### 4"])
    res = select(cs, method="flat")
    assert (res.answer, res.confidence) == ("3", pytest.approx(0.75))
    soft = select(cs, method="flat", utility="chrf")
    u = UTILITIES["chrf"].matrix([c.text for c in cs])
    assert soft.confidence == pytest.approx(u[soft.index].mean())
    assert 0.0 <= soft.confidence <= 1.0


# ------------------------------------------------------------------ majority == flat + answer
def test_majority_equals_flat_with_answer_on_random_cases():
    rng = random.Random(7)
    pool = ["#### 1", "The answer is 1.", "#### 2", "2", "no answer", "The answer is 3", "#### 1.0"]
    for _ in range(200):
        n = rng.randint(1, 12)
        cs = [
            Candidate(rng.randint(0, 3), rng.choice(pool), -rng.random() * 10, rng.randint(1, 9))
            for _ in range(n)
        ]
        for suffix in ("", "_weighted"):
            maj = select(cs, method="majority" + suffix, utility="chrf")  # utility ignored
            flat = select(cs, method="flat" + suffix, utility="answer")
            assert maj.index == flat.index
            assert maj.scores == pytest.approx(flat.scores)
            assert maj.confidence == pytest.approx(flat.confidence)
            assert maj.utility == "answer"


# ------------------------------------------------------------------ registries
def test_registries_contain_the_documented_names():
    assert {"answer", "chrf", "bleu", "rouge_l", "token_f1"} <= set(UTILITIES)
    assert set(METHODS) >= {
        "flat",
        "model",
        "majority",
        "flat_weighted",
        "model_weighted",
        "majority_weighted",
    }
    for name, utility in UTILITIES.items():
        assert isinstance(utility, Utility), name
        assert utility.__doc__


def test_register_custom_utility_and_method():
    @register_utility("test_length")
    class Length(Utility):
        symmetric = True

        def _matrix(self, features):
            n = np.array([len(f) for f in features], dtype=float)
            return np.minimum(n[:, None], n[None, :]) / np.maximum(n[:, None], n[None, :])

    try:
        assert get_utility("test_length")[0] == "test_length"
        res = select(cands(["aa 1", "aaaa 2", "aaa 3"]), "flat", "test_length")
        assert res.index == 2
        register_method("test_flat_w", Flat(MethodConfig(weighted=True)))
        assert "test_flat_w" in METHODS
    finally:
        UTILITIES._items.pop("test_length", None)
        METHODS._items.pop("test_flat_w", None)


def test_a_registered_name_cannot_be_replaced():
    before = METHODS["flat"]
    with pytest.raises(ValueError, match="method 'flat' is already registered"):
        register_method("flat", Flat(MethodConfig(weighted=True)))
    with pytest.raises(ValueError, match="utility 'chrf' is already registered"):
        register_utility("chrf", lambda a, b: 1.0)
    assert METHODS["flat"] is before and not METHODS["flat"].config.weighted


def test_matrix_equals_pairwise_calls_and_dedupes():
    texts = ["the cat sat", "the cat sat", "a dog ran 5", "", "the cat sat on the mat 5"]
    for name, utility in UTILITIES.items():
        m = utility.matrix(texts)
        assert m.shape == (5, 5)
        for i, a in enumerate(texts):
            for j, b in enumerate(texts):
                assert m[i, j] == pytest.approx(utility(a, b), abs=1e-12), (name, a, b)
        if utility.symmetric:
            assert np.array_equal(m, m.T), name


# ------------------------------------------------------------------ kernels vs brute force
def brute_matches(seqs, n):
    counts = [Counter(tuple(s[i : i + n]) for i in range(len(s) - n + 1)) for s in seqs]
    return np.array([[sum((a & b).values()) for b in counts] for a in counts], dtype=float)


@pytest.mark.parametrize("alphabet", [3, 50, 5000])
def test_clipped_matches_brute_force(alphabet, monkeypatch):
    rng = np.random.default_rng(alphabet)
    seqs = [rng.integers(0, alphabet, rng.integers(0, 40)) for _ in range(9)]
    seqs.append(seqs[0].copy())
    for fallback in (False, True):
        if fallback:  # numpy < 2 path: popcount by lookup table
            monkeypatch.setattr(_ngrams, "_BITWISE_COUNT", None)
        ids = _ngrams.ngram_ids(seqs, 6)
        for n, (doc, gid) in enumerate(ids, start=1):
            got = _ngrams.clipped_matches(doc, gid, len(seqs))
            assert np.array_equal(got, brute_matches([s.tolist() for s in seqs], n)), n


def test_ngram_ids_exact_with_large_vocabulary():
    # 5000^6 overflows int64: the ids are renumbered on the way and stay exact
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 5000, 30) for _ in range(4)]
    seqs.append(np.concatenate([seqs[0][:10], seqs[1][5:25]]))
    for n, (_doc, gid) in enumerate(_ngrams.ngram_ids(seqs, 6), start=1):
        grams = [
            tuple(seqs[d][i : i + n]) for d in range(len(seqs)) for i in range(len(seqs[d]) - n + 1)
        ]
        assert len(grams) == len(gid)
        # equal ids <=> equal n-grams
        by_id: dict[int, set] = {}
        for g, i in zip(grams, gid.tolist(), strict=True):
            by_id.setdefault(i, set()).add(g)
        assert all(len(v) == 1 for v in by_id.values())
        assert len(by_id) == len(set(grams))


def lcs_dp(a, b):
    t = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            t[i][j] = t[i - 1][j - 1] + 1 if a[i - 1] == b[j - 1] else max(t[i - 1][j], t[i][j - 1])
    return t[-1][-1]


def test_pair_lcs_brute_force():
    rng = random.Random(3)
    for alphabet in (2, 4, 30):
        seqs = [[rng.randrange(alphabet) for _ in range(rng.randint(0, 70))] for _ in range(8)]
        seqs.append(list(seqs[1]))
        got = _ngrams.pair_lcs(seqs)
        want = np.array([[lcs_dp(a, b) for b in seqs] for a in seqs])
        assert np.array_equal(got, want), alphabet
