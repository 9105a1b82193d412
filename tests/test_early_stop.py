"""Early stopping of the fan-out (issue 30): the stopping rules on hand cases and against brute
force (pure), then through the real engine and server on the shared tiny model: ``exact`` gives
``off``'s answer and chosen text, aborted candidates leave nothing running in vLLM, streams end
with their result, a disconnect still aborts everything."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import socket
import time

import httpx
import pytest

from ivonserve import mbr
from ivonserve.mbr.stopping import (
    Pending,
    StopPolicy,
    Tracker,
    beta_confidence,
    confidence_reached,
    exact_winner,
    unsupported,
)

METHODS = ["flat", "model", "majority", "flat_weighted", "model_weighted", "majority_weighted"]


def said(answer: str | None) -> str:
    return "I cannot tell." if answer is None else f"So the answer is {answer}."


def cand(draw: int, answer: str | None, mean: float = -0.5, tokens: int = 4) -> mbr.Candidate:
    """A finished candidate with this answer and mean log-probability."""
    return mbr.Candidate(draw, said(answer), logprob=mean * tokens, tokens=tokens)


# --- confidence: the Beta criterion ---------------------------------------------------------------
def reference_beta(a: int, b: int) -> float:
    """Adaptive-Consistency's BetaStoppingCriteria, as its stopping_criterias.py computes it."""
    integrate = pytest.importorskip("scipy.integrate")
    a, b = float(a), float(b)
    num = integrate.quad(lambda x: x**a * (1 - x) ** b, 0.5, 1)[0]
    return num / integrate.quad(lambda x: x**a * (1 - x) ** b, 0, 1)[0]


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        (0, 0, 1 / 2),
        (1, 0, 3 / 4),  # 1 - 2^-2
        (2, 0, 7 / 8),
        (3, 0, 15 / 16),
        (4, 0, 31 / 32),  # the first unanimous count past 0.95
        (2, 2, 1 / 2),  # a tie: no leader
        (3, 1, 26 / 32),  # (C(5,0)+C(5,1)+C(5,2)+C(5,3)) / 2^5
        (5, 2, 219 / 256),
        (6, 1, 247 / 256),
        (1, 3, 6 / 32),
    ],
)
def test_beta_confidence_is_the_reference_formula(a, b, expected):
    assert beta_confidence(a, b) == pytest.approx(expected, abs=1e-15)
    assert beta_confidence(a, b) == pytest.approx(reference_beta(a, b), abs=1e-9)


def test_beta_confidence_matches_the_reference_on_a_grid():
    for a, b in itertools.product(range(0, 33, 3), range(0, 20, 4)):
        assert beta_confidence(a, b) == pytest.approx(reference_beta(a, b), abs=1e-8), (a, b)
    with pytest.raises(ValueError):
        beta_confidence(1.5, 0)


def test_confidence_counts_answers_with_a_minimum():
    four = ["18"] * 4
    assert confidence_reached(four, 0.95)  # 31/32
    assert not confidence_reached(four[:3], 0.95)  # 15/16
    assert not confidence_reached(four, 0.95, min_finished=5)
    assert not confidence_reached([*four, "7"], 0.95)  # (4, 1): 57/64
    assert confidence_reached([*four, "7", "18", "18"], 0.95)  # (6, 1): 247/256
    assert not confidence_reached([None] * 8, 0.5)  # no answer is no leader
    assert confidence_reached([None, None, None, "3"], 0.75)  # (1, 0): 3/4; min counts all
    assert not confidence_reached([None, None, "3"], 0.75, min_finished=4)


# --- exact: hand cases ------------------------------------------------------------------------
def test_exact_flat_needs_a_lead_larger_than_the_candidates_running():
    running = Pending(draw=0, logprob=-100.0)  # its final mean is at most -10: outranks nobody
    three_to_one = [cand(0, "5"), cand(0, "5"), cand(0, "5"), cand(0, "7"), running]
    assert exact_winner(three_to_one, "flat", max_tokens=10) == 0
    two_to_one = [cand(0, "5"), cand(0, "5"), cand(0, "7"), running]
    assert exact_winner(two_to_one, "flat", max_tokens=10) is None  # 2 vs 1 + 1: a tie is left
    # answerless candidates never vote, but a new answer could still arrive
    lonely = [cand(0, "5"), cand(0, None), cand(0, None), running]
    assert exact_winner(lonely, "flat", max_tokens=10) is None
    assert exact_winner([cand(0, None), running], "flat", max_tokens=10) is None
    # nothing running: select() decides
    done = [cand(0, "5", -0.9), cand(0, "5", -0.2), cand(0, "7")]
    assert exact_winner(done, "flat", 10) == mbr.select(done, "flat", "answer").index == 1


def test_exact_waits_for_the_representative():
    """The answer 5 is decided, but the running candidate might still join it with a higher mean
    logprob: its bound is its cumulative logprob over max_tokens."""
    best = cand(0, "5", mean=-0.3)
    slots = [cand(0, "5", mean=-0.6), best, cand(0, "5", mean=-0.4), cand(0, "7")]
    assert exact_winner([*slots, Pending(0, logprob=-2.0)], "flat", max_tokens=10) is None
    assert exact_winner([*slots, Pending(0, logprob=-3.5)], "flat", max_tokens=10) == 1
    # a bound equal to the best's mean (-0.3) loses only from a higher index (ties: lowest index)
    assert exact_winner([*slots, Pending(0, logprob=-3.0)], "flat", max_tokens=10) == 1
    assert exact_winner([Pending(0, logprob=-3.0), *slots], "flat", max_tokens=10) is None
    # a candidate that has not started may still be perfect (bound 0)
    assert exact_winner([*slots, Pending(0)], "flat", max_tokens=10) is None


def test_exact_model_wise_bounds_each_draws_share():
    """Eq. 10 with the answer utility: each draw m adds its share c_m(a)/n_m of an answer it
    produced; a running sample of draw m can move at most 1/n_m of that draw's share."""
    low = -100.0
    # draw 0: 5, 5; draw 1: 7, running. 5 scores 1; 7 scores 1/2 or 1: undecided
    slots = [cand(0, "5"), cand(0, "5"), cand(1, "7"), Pending(1, low)]
    assert exact_winner(slots, "model", max_tokens=10) is None
    # draw 1: 5, running: 5 scores >= 1.5, anything else <= 0.5
    slots = [cand(0, "5"), cand(0, "5"), cand(1, "5"), Pending(1, low)]
    assert exact_winner(slots, "model", max_tokens=10) == 0
    # a whole draw still running could give any answer its full share of 1
    slots = [
        cand(0, "5"),
        cand(0, "5"),
        cand(1, "5"),
        cand(1, "7"),
        Pending(2, low),
        Pending(2, low),
    ]
    assert exact_winner(slots, "model", max_tokens=10) is None  # 5: 1.5 vs 7: 0.5 + 1
    slots = [cand(0, "5")] * 2 + [cand(1, "5")] * 2 + [Pending(2, low)] * 2
    assert exact_winner(slots, "model", max_tokens=10) == 0  # 5: 2 vs at most 1


def test_exact_weighted_bounds_the_running_weight():
    """Weighted: a running candidate weighs at most exp(its mean bound)."""
    slots = [cand(0, "5", -0.1), cand(0, "5", -0.1), cand(0, "7", -0.1)]
    # the running one may weigh up to exp(-0.1): 7 could reach 5 exactly
    assert exact_winner([*slots, Pending(0, -1.0)], "flat_weighted", max_tokens=10) is None
    # at most exp(-2): 7 stays below 5 (the representative bound holds too)
    assert exact_winner([*slots, Pending(0, -20.0)], "flat_weighted", max_tokens=10) == 0
    # unweighted the same counts leave a tie possible
    assert exact_winner([*slots, Pending(0, -20.0)], "flat", max_tokens=10) is None


def test_exact_refuses_methods_it_cannot_bound():
    with pytest.raises(ValueError):
        exact_winner([cand(0, "5"), Pending(0)], "nope", 10)


def test_which_rules_each_utility_allows():
    assert unsupported("off", "model", "chrf") is None
    for rule in ("exact", "confidence"):
        for method in METHODS:
            assert unsupported(rule, method, "answer") is None
        for utility in ("chrf", "bleu", "rouge_l", "token_f1"):
            assert "only 'off'" in unsupported(rule, "model", utility)
            assert unsupported(rule, "majority", utility) is None  # majority votes on answers
    assert "unknown rule" in unsupported("maybe", "model", "answer")


# --- exact: brute force -------------------------------------------------------------------------
def _completions(pending: Pending, max_tokens: int) -> list[tuple[str | None, float, int]]:
    """Ways a running candidate may end: an answer (seen, new, none) and (logprob, tokens) with
    logprob <= its logprob so far and tokens <= max_tokens (the extremes of its bound)."""
    ends = [(pending.logprob, max_tokens), (pending.logprob, 3), (pending.logprob - 2, max_tokens)]
    return [(a, lp, t) for a in ("1", "2", "3", None) for lp, t in ends]


@pytest.mark.parametrize("method", METHODS)
def test_exact_decisions_hold_for_every_way_the_running_ones_end(method):
    """Random small fan-outs: whenever ``exact_winner`` decides, every completion of the running
    candidates makes select() over all of them pick that same candidate (answer and text)."""
    rng = random.Random(hash(method) % 1000)
    max_tokens = 10
    decided = 0
    for _ in range(120):
        n_draws, n_samples = rng.choice([(1, 5), (2, 3), (3, 2)])
        n = n_draws * n_samples
        running = set(rng.sample(range(n), rng.choice([1, 1, 2])))
        slots: list[mbr.Candidate | Pending] = []
        for slot in range(n):
            draw = slot // n_samples
            if slot in running:
                slots.append(Pending(draw, rng.choice([0.0, -1.0, -5.0, -20.0, -60.0])))
            else:
                answer = rng.choice(["1", "1", "1", "2", None])
                mean = rng.choice([-0.1, -0.2, -0.5, -1.0])
                slots.append(cand(draw, answer, mean, tokens=rng.choice([2, 4])))
        winner = exact_winner(slots, method, max_tokens)
        if winner is None:
            continue
        decided += 1
        assert isinstance(slots[winner], mbr.Candidate)
        options = [_completions(slots[i], max_tokens) for i in sorted(running)]
        for ends in itertools.product(*options):
            full = list(slots)
            for i, (answer, logprob, tokens) in zip(sorted(running), ends, strict=True):
                full[i] = mbr.Candidate(slots[i].draw, said(answer), logprob, tokens)
            chosen = mbr.select(full, method, "answer")
            assert chosen.index == winner, (slots, ends)
        finished = [s for s in slots if isinstance(s, mbr.Candidate)]
        alone = mbr.select(finished, method, "answer")
        assert alone.text == slots[winner].text and alone.answer is not None
    assert decided >= 10  # the test decided something


# --- the tracker --------------------------------------------------------------------------------
def test_tracker_confidence_stops_at_the_fourth_agreeing_answer():
    tracker = Tracker(StopPolicy("confidence", 0.95, 4), "model", 2, 4, max_tokens=16)
    for k, slot in enumerate([0, 4, 1, 5]):
        assert not tracker.should_stop()
        tracker.finished(slot, said("18"), -1.0, 4)
        assert tracker.should_stop() == (k == 3)
    assert not tracker.should_stop()  # nothing new since


def test_tracker_exact_rechecks_as_the_running_ones_grow():
    tracker = Tracker(StopPolicy("exact"), "flat", 1, 5, max_tokens=10)
    for slot in range(4):
        tracker.finished(slot, said("5"), -2.0, 4)  # mean -0.5
    assert not tracker.should_stop()  # slot 4 has not started: it could still be the best
    # its bound falls below -0.5 at once, but growth is rechecked once per len(slots) updates
    for logprob in (-5.5, -5.6, -5.7, -5.8):
        tracker.progress(4, logprob)
        assert not tracker.should_stop()
    tracker.progress(4, -5.8)  # no news: not counted
    assert not tracker.should_stop()
    tracker.progress(4, -5.9)  # the fifth update: a recheck
    assert tracker.should_stop() and tracker.decided == 0
    off = Tracker(StopPolicy("off"), "flat", 1, 2, 10)
    off.finished(0, said("5"), -1.0, 2)
    assert not off.should_stop()


def test_stop_policy_checks_its_values():
    with pytest.raises(ValueError):
        StopPolicy("sometimes")
    with pytest.raises(ValueError):
        StopPolicy("confidence", threshold=0.4)
    with pytest.raises(ValueError):
        StopPolicy("confidence", min_finished=0)


# --- through the real engine (the shared tiny model) ------------------------------------------
PROMPTS = [
    "What is 2 + 3?",
    "Half of 48?",
    "What is 10 - 7?",
    "What is 4 * 6?",
    "Natalia sold 48 clips in April and half as many in May. How many clips did she sell?",
    "Weng earns 12 dollars an hour for babysitting. How much did she earn?",
    "Betty is saving money for a new wallet which costs 100 dollars.",
    "James writes a 3-page letter to 2 different friends twice a week.",
    "The answer is 72. In May she sold 48 / 2 = 24 clips.",
    "How many clips did she sell altogether in April and May?",
]


def _tracker(policy: StopPolicy, method: str, n_draws: int, n_samples: int, sampling) -> Tracker:
    return Tracker(policy, method, n_draws, n_samples, sampling.max_tokens)


def _chosen(fan, method: str) -> tuple:
    from ivonserve.server.generate.serving import select

    pick = select(fan, method, "answer")
    winner = fan.candidates[pick.index]
    return pick.answer, pick.text, winner.draw, winner.sample


def test_exact_equals_off_for_seeded_requests(live, engine):
    """Every method exact supports, over prompts, seeds, stop strings and greedy decoding:
    exact's answer, chosen text and chosen (draw, sample) are off's, and its finished
    candidates are off's token for token. On the tiny model exact stops seldom (its samples are
    all about equally unlikely, so a running one could always still be the best). Whether it
    fires depends on timing too: vLLM coalesces outputs when the consumer lags, so short cases
    can finish before exact looks. The 128-token cases are where it reliably does."""
    from ivonserve.engine import SamplingOptions

    cases = []
    for prompt in PROMPTS[:5]:
        cases += [
            (prompt, 3, 4, SamplingOptions(max_tokens=16, temperature=0.5, seed=0)),
            (prompt, 3, 4, SamplingOptions(max_tokens=16, temperature=0.5, seed=1)),
            (prompt, 3, 4, SamplingOptions(max_tokens=32, temperature=0.5, seed=0, stop=("4",))),
            (prompt, 3, 4, SamplingOptions(max_tokens=128, temperature=0.5, seed=0, stop=("4",))),
            (prompt, 3, 4, SamplingOptions(max_tokens=128, temperature=0.2, seed=0)),
            (prompt, 2, 8, SamplingOptions(max_tokens=16, temperature=0.0)),
        ]
    stops = 0
    for prompt, n_draws, n_samples, sampling in cases:
        prompt_ids = engine.render(prompt)
        off = live.run(engine.fan_out(prompt_ids, n_draws, n_samples, sampling))
        tokens = {(c.draw, c.sample): c.token_ids for c in off.candidates}
        for method in METHODS:
            tracker = _tracker(StopPolicy("exact"), method, n_draws, n_samples, sampling)
            fan = live.run(
                engine.fan_out(prompt_ids, n_draws, n_samples, sampling, None, None, tracker)
            )
            case = (prompt, n_draws, n_samples, sampling, method)
            assert _chosen(fan, method) == _chosen(off, method), case
            assert all(c.token_ids == tokens[c.draw, c.sample] for c in fan.candidates), case
            assert len(fan.candidates) + len(fan.stopped) == n_draws * n_samples
            assert all(c.finish_reason == "early_stop" for c in fan.stopped)
            assert fan.completion_tokens <= off.completion_tokens
            stops += bool(fan.stopped)
    assert engine.num_unfinished_requests() == 0
    assert stops > 0  # exact did stop somewhere, and still agreed


async def _kv_blocks_free(engine) -> bool:
    """vLLM's own scheduler: it resets the prefix cache only when no request holds KV blocks."""
    for _ in range(100):
        if await engine.llm.reset_prefix_cache():
            return True
        await asyncio.sleep(0.05)
    return False


def test_stopped_candidates_leave_no_request_running_in_vllm(live, engine):
    """confidence at 0.5 after one finished candidate: the first answer stops the fan-out, and
    the samples still running are aborted in vLLM (its output processor tracks none, its
    scheduler holds no KV block), not merely dropped; usage counts the tokens they made."""
    from ivonserve.engine import SamplingOptions

    policy = StopPolicy("confidence", threshold=0.5, min_finished=1)
    aborted = engine.aborted_requests

    async def scenario(seed: int):
        sampling = SamplingOptions(max_tokens=400, temperature=1.0, seed=seed, stop=("4",))
        fan = await engine.fan_out(
            PROMPTS[4], 2, 4, sampling, None, None, _tracker(policy, "flat", 2, 4, sampling)
        )
        return fan, engine.num_unfinished_requests(), await _kv_blocks_free(engine)

    for seed in range(8):  # the first seed whose fan-out is cut short while others still run
        fan, unfinished, free = live.run(scenario(seed))
        assert unfinished == 0 and free
        if any(c.tokens < 400 for c in fan.stopped):
            break
    else:
        pytest.fail("no fan-out was stopped early")
    assert fan.stopped and all(c.finish_reason == "early_stop" for c in fan.stopped)
    decoded = sum(c.tokens for c in fan.candidates) + sum(c.tokens for c in fan.stopped)
    assert fan.completion_tokens == decoded
    assert any(mbr.utilities.cached_extract_answer(c.text) for c in fan.candidates)
    assert engine.aborted_requests == aborted  # stopping is not a client's abort


def test_a_cancelled_caller_still_aborts_an_early_stopping_fan_out(live, engine):
    from ivonserve.engine import SamplingOptions

    async def scenario():
        sampling = SamplingOptions(max_tokens=450, temperature=1.0, ignore_eos=True, seed=1)
        tracker = _tracker(StopPolicy("exact"), "model", 4, 8, sampling)
        before = engine.aborted_requests
        task = asyncio.create_task(engine.fan_out(PROMPTS[0], 4, 8, sampling, None, None, tracker))
        while engine.num_unfinished_requests() < 32:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return engine.num_unfinished_requests(), engine.aborted_requests - before

    unfinished, aborted = live.run(scenario())
    assert unfinished == 0 and aborted == 4
    assert live.run(_kv_blocks_free(engine))


# --- over HTTP -----------------------------------------------------------------------------------
# stop strings end samples at random lengths: some finish early, others run on
STOPPING = {
    "n_models": 2,
    "n_samples": 4,
    "max_tokens": 300,
    "temperature": 1.0,
    "stop": ["4"],
    "utility": "answer",
    "early_stop": "confidence",
    "early_stop_threshold": 0.5,
}


def sse_events(response: httpx.Response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def _stopped_request(client: httpx.Client, body: dict) -> dict:
    """The first seed whose request early stopping cut short (the tiny model decides)."""
    for seed in range(12):
        answer = client.post("/generate", json={**body, "seed": seed})
        assert answer.status_code == 200, answer.text
        if answer.json()["n_stopped"]:
            return answer.json()
    pytest.fail("no request was stopped early")


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_generate_reports_finished_stopped_and_the_tokens_generated(live, client):
    before = scrape(live.url)
    body = {"prompt": PROMPTS[4], "return_candidates": True, **STOPPING}
    answer = _stopped_request(client, body)
    after = scrape(live.url)
    assert answer["early_stop"] == "confidence"
    assert answer["n_finished"] + answer["n_stopped"] == 8
    candidates = answer["candidates"]
    stopped = [c for c in candidates if c["finish_reason"] == "early_stop"]
    assert len(stopped) == answer["n_stopped"] >= 1
    assert all(c["score"] is None and c["answer"] is None for c in stopped)
    assert all(c["score"] is not None for c in candidates if c not in stopped)
    assert answer["usage"]["completion_tokens"] == sum(c["tokens"] for c in candidates)
    chosen = next(c for c in candidates if (c["draw"], c["sample"]) == (
        answer["chosen_draw"], answer["chosen_sample"]))  # fmt: skip
    assert chosen["text"] == answer["text"] and chosen["finish_reason"] != "early_stop"

    def moved(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert moved("ivonserve_early_stops_total", model="tiny", rule="confidence") >= 1
    assert moved("ivonserve_stopped_candidates_total", model="tiny") >= answer["n_stopped"]
    assert moved("ivonserve_saved_tokens_total", model="tiny") > 0
    assert metric(after, "ivonserve_requests_in_flight") == 0


def test_stream_with_early_stop_shows_stopped_candidates_and_ends_with_done(client):
    body = {"prompt": PROMPTS[4], "stream": True, "return_candidates": True, **STOPPING}
    for seed in range(12):
        with client.stream("POST", "/generate", json={**body, "seed": seed}) as response:
            assert response.status_code == 200
            events = sse_events(response)
        assert events[-1] == "[DONE]"
        (result,) = [e["result"] for e in events[:-1] if e["type"] == "result"]
        assert events[-2]["type"] == "result"
        if result["n_stopped"]:
            break
    else:
        pytest.fail("no stream was stopped early")
    progress = [c for e in events[:-2] if e["type"] == "candidates" for c in e["candidates"]]
    assert len(progress) == 8  # every draw once, stopped candidates as such
    streamed = [c for c in progress if c["finish_reason"] == "early_stop"]
    assert len(streamed) == result["n_stopped"]
    assert sorted((c["draw"], c["sample"]) for c in streamed) == sorted(
        (c["draw"], c["sample"]) for c in result["candidates"] if c["finish_reason"] == "early_stop"
    )


def test_openai_routes_take_the_extension_fields(live):
    import openai

    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="none", max_retries=0)
    extra = {"n_models": 2, "n_samples": 4, "utility": "answer", "early_stop": "exact"}
    kwargs = {"model": "tiny", "max_tokens": 40, "temperature": 1.0, "stop": ["4"], "seed": 3,
              "extra_body": extra}  # fmt: skip
    reply = client.chat.completions.create(messages=[{"role": "user", "content": PROMPTS[0]}],
                                           **kwargs)  # fmt: skip
    info = reply.model_extra["ivonserve"]
    assert info["early_stop"] == "exact" and info["n_finished"] + info["n_stopped"] == 8
    chunks = list(client.completions.create(prompt=PROMPTS[0], stream=True, **kwargs))
    done = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert done and done[-1].model_extra["ivonserve"]["early_stop"] == "exact"


def test_disconnect_mid_request_with_early_stop_aborts_everything(live, engine):
    """Nothing finishes (ignore_eos, 450 tokens), so the rule never fires: the client leaving is
    what must abort all 32 sequences."""
    body = json.dumps({"prompt": PROMPTS[0], "n_models": 4, "n_samples": 8, "max_tokens": 450,
                       "temperature": 1.0, "ignore_eos": True, "utility": "answer",
                       "early_stop": "exact"}).encode()  # fmt: skip
    aborted = engine.aborted_requests
    sock = socket.create_connection(("127.0.0.1", live.port))
    sock.sendall(
        b"POST /generate HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    deadline = time.monotonic() + 60
    while engine.num_unfinished_requests() < 32:
        assert time.monotonic() < deadline, "the request never reached the engine"
        time.sleep(0.01)
    sock.close()
    deadline = time.monotonic() + 30
    while engine.num_unfinished_requests() or engine.aborted_requests == aborted:
        assert time.monotonic() < deadline, engine.num_unfinished_requests()
        time.sleep(0.02)
    assert engine.aborted_requests - aborted == 4
    assert live.run(_kv_blocks_free(engine))


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"early_stop": "exact", "utility": "chrf"}, "early_stop", "only 'off'"),
        ({"early_stop": "confidence"}, "early_stop", "chrf"),  # the tiny server's default utility
        ({"early_stop": "exact", "utility": "answer", "early_stop_threshold": 0.9},
         "early_stop_threshold", "confidence"),
        ({"early_stop": "confidence", "utility": "answer", "early_stop_threshold": 0.3},
         "early_stop_threshold", "0.5"),
        ({"early_stop": "sometimes"}, "early_stop", "exact"),
    ],
)  # fmt: skip
def test_rules_a_request_cannot_use_are_422_naming_the_field(client, body, field, words):
    answer = client.post("/generate", json={"prompt": "hi", "max_tokens": 2, **body})
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert field in error["message"] and words in error["message"]


def test_the_server_default_applies_only_where_the_utility_allows_it(serve_with):
    srv = serve_with(early_stop="exact")
    body = {"prompt": PROMPTS[1], "max_tokens": 4, "n_models": 2, "n_samples": 2, "seed": 1}
    free_text = httpx.post(f"{srv.url}/generate", json=body, timeout=120).json()
    assert free_text["early_stop"] == "off" and free_text["utility"] == "chrf"
    answers = httpx.post(f"{srv.url}/generate", json={**body, "utility": "answer"}, timeout=120)
    assert answers.json()["early_stop"] == "exact"
    off = httpx.post(f"{srv.url}/generate", json={**body, "utility": "answer",
                                                  "early_stop": "off"}, timeout=120)  # fmt: skip
    assert off.json()["early_stop"] == "off"
    assert off.json()["text"] == answers.json()["text"]


# --- the measurement tooling --------------------------------------------------------------------
def test_gsm8k_client_records_early_stopping_and_the_tables_compare_arms(live, tmp_path):
    from conftest import bench_script

    from ivonserve.bench import gsm8k
    from ivonserve.cli import build_parser

    data = tmp_path / "questions.jsonl"
    rows = [{"question": "What is 2 + 3?", "answer": "#### 5"},
            {"question": "Half of 48?", "answer": "#### 24"},
            {"question": "What is 10 - 7?", "answer": "#### 3"}]  # fmt: skip
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    arms = {
        "off": ["--early-stop", "off"],
        "exact": ["--early-stop", "exact"],
        "confidence-0.5": ["--early-stop", "confidence", "--early-stop-threshold", "0.5"],
    }
    for name, flags in arms.items():
        argv = ["bench", "gsm8k", "--url", live.url, "--data", str(data), "--grid", "2x2",
                "--max-tokens", "12", "--no-progress", "--out", str(tmp_path / "tiny" / name),
                *flags]  # fmt: skip
        results = asyncio.run(gsm8k.run(build_parser().parse_args(argv)))
        assert results["early_stop"] == flags[1]
        records = [json.loads(x) for x in (tmp_path / "tiny" / name / "records.jsonl").open()]
        assert {r["early_stop"] for r in records} == {flags[1]}
        assert all(r["n_finished"] + r["n_stopped"] == 4 and r["text_sha"] for r in records)
    tables = bench_script("early_stop_tables")
    assert tables.main([str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "| off | 2x2 | 3 | 100.0% | 100.0% |" in report
    assert "| exact | 2x2 | 3 | 100.0% | 100.0% |" in report  # exact never differs from off
    assert "| confidence-0.5 | 2x2 | 3 |" in report
    assert (tmp_path / "early_stop.png").stat().st_size > 0
    summary = json.loads((tmp_path / "early_stop.json").read_text())
    assert [r["arm"] for r in summary["tiny"]] == ["off", "exact", "confidence-0.5"]
