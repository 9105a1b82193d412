"""The HTTP server over real HTTP (uvicorn in a thread, httpx), on the shared tiny engine."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
from conftest import POOL_SIZE

from ivonserve import cli, mbr
from ivonserve.errors import RequestTimeout, api_error
from ivonserve.server import GenerationService
from ivonserve.server.limits import Admission
from ivonserve.server.metrics import Metrics

PROMPT = "Natalia sold 48 clips in April and half as many in May. How many clips did she sell?"


def post(client: httpx.Client, body: dict, status: int = 200) -> dict:
    answer = client.post("/generate", json=body)
    assert answer.status_code == status, answer.text
    assert "Traceback" not in answer.text
    return answer.json()


# --- start-up ---------------------------------------------------------------------------------
def test_app_answers_while_the_engine_starts(live):
    probe = live.startup_probe
    assert probe["health"] == (200, {"status": "ok"})
    code, body = probe["ready"]
    assert code == 503 and body["status"] == "starting"
    code, body = probe["generate"]
    assert code == 503
    assert body["error"]["code"] == 503 and "not ready" in body["error"]["message"]
    code, body = probe["models"]
    assert code == 200 and body["data"][0]["ready"] is False


def test_health_ready_and_models(client):
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    phases = ready.json()["startup_phases_s"]
    assert list(phases) == ["tokenizer", "pool", "vllm", "register", "warm_up", "total"]
    assert all(v >= 0 for v in phases.values())
    assert phases["total"] == pytest.approx(sum(v for k, v in phases.items() if k != "total"),
                                            abs=0.01)  # fmt: skip
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    card, adapter = models["data"]
    assert card["id"] == "tiny" and card["pool_size"] == POOL_SIZE and card["ready"] is True
    assert card["kind"] == "posterior" and card["default"] is True and card["ess"] == 1e4
    assert adapter["id"] == "tiny-mean" and adapter["kind"] == "adapter"
    assert adapter["ess"] is None and adapter["default"] is False


# --- generation -------------------------------------------------------------------------------
def test_greedy_text_equals_peft_for_every_draw_and_the_mean(client, engine, hf):
    body = {
        "prompt": PROMPT,
        "n_models": POOL_SIZE,
        "n_samples": 1,
        "temperature": 0,
        "max_tokens": 16,
        "ignore_eos": True,
        "return_candidates": True,
    }
    draws = post(client, body)
    mean = post(client, {**body, "n_models": 0})
    pool = engine.pools["tiny"]
    prompt_ids = hf.prompt_ids(PROMPT)
    assert [c["draw"] for c in draws["candidates"]] == list(range(POOL_SIZE))
    for cand in draws["candidates"]:
        expected = hf.greedy(pool.draws[cand["draw"]].lora_path, prompt_ids, 16)
        assert cand["text"] == hf.decode(expected), f"draw {cand['draw']}"
        assert cand["tokens"] == 16
    (only,) = mean["candidates"]
    assert only["draw"] is None
    assert only["text"] == hf.decode(hf.greedy(pool.mean.lora_path, prompt_ids, 16))
    assert mean["text"] == only["text"] and mean["chosen_draw"] is None
    # the old names stay, as aliases with the same values (issue 31)
    assert all(c["model"] == c["draw"] for c in [*draws["candidates"], only])
    assert draws["chosen_model"] == draws["chosen_draw"] and mean["chosen_model"] is None


def test_fan_out_over_http(client):
    body = {
        "prompt": PROMPT,
        "n_models": 3,
        "n_samples": 2,
        "max_tokens": 12,
        "temperature": 1.0,
        "seed": 11,
        "return_candidates": True,
    }
    first = post(client, body)
    cands = first["candidates"]
    assert [(c["draw"], c["sample"]) for c in cands] == [
        (0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1),
    ]  # fmt: skip
    assert len({c["text"] for c in cands}) >= 4  # different draws, different candidates
    assert first["text"] in {c["text"] for c in cands}
    pick = (first["chosen_draw"], first["chosen_sample"])
    chosen = [c for c in cands if (c["draw"], c["sample"]) == pick]
    assert chosen and chosen[0]["text"] == first["text"]
    eligible = [c for c in cands if c["answer"] is not None] or cands  # answers first
    assert chosen[0]["score"] == max(c["score"] for c in eligible)
    assert 0 <= first["confidence"] <= 1
    # echoed settings, defaults filled in
    assert first["n_models"] == 3 and first["n_samples"] == 2 and first["seed"] == 11
    assert first["selection"] == "model" and first["utility"] == "chrf"
    assert first["max_tokens"] == 12 and first["temperature"] == 1.0 and first["top_p"] == 1.0
    usage = first["usage"]
    assert usage["completion_tokens"] == sum(c["tokens"] for c in cands)
    assert usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    timing = first["timing"]
    assert 0 <= timing["generate_s"] <= timing["total_s"] and timing["select_s"] >= 0
    # the same seed gives the same response
    again = post(client, body)
    for key in ("text", "answer", "confidence", "chosen_draw", "chosen_sample", "usage"):
        assert again[key] == first[key]
    assert again["candidates"] == first["candidates"]
    assert again["id"] != first["id"]


def test_defaults_messages_and_random_seed(client, tiny_settings):
    first = post(client, {"prompt": "What is 2 + 3?", "return_candidates": False})
    assert first["candidates"] is None
    assert first["n_models"] == tiny_settings.default_n_models
    assert first["n_samples"] == tiny_settings.default_n_samples
    assert first["max_tokens"] == tiny_settings.default_max_tokens
    assert first["temperature"] == tiny_settings.default_temperature
    assert first["seed"] >= 0 and first["model"] == "tiny"
    # messages = the prompt as one user message (same chat template, same seed: same answer)
    seeded = {"n_models": 2, "n_samples": 2, "seed": 5, "return_candidates": True}
    by_prompt = post(client, {"prompt": "What is 2 + 3?", **seeded})
    by_messages = post(
        client, {"messages": [{"role": "user", "content": "What is 2 + 3?"}], **seeded}
    )
    assert by_messages["candidates"] == by_prompt["candidates"]
    with_system = post(
        client,
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "What is 2 + 3?"}], **seeded},
    )  # fmt: skip
    assert with_system["usage"]["prompt_tokens"] > by_prompt["usage"]["prompt_tokens"]
    # the named posterior is accepted
    assert post(client, {"prompt": "hi", "model": "tiny", "max_tokens": 2})["model"] == "tiny"


def assert_selected_by(answer: dict, method: str, utility: str) -> None:
    """The server chose what mbr.select chooses on the candidates it returned, with the same
    scores and confidence: the request's method and utility were the ones applied."""
    candidates = answer["candidates"]
    chosen = mbr.select(
        [
            mbr.Candidate(
                draw=c["draw"] or 0, text=c["text"], logprob=c["logprob"], tokens=c["tokens"]
            )
            for c in candidates
        ],
        method=method,
        utility=utility,
    )
    assert [c["score"] for c in candidates] == pytest.approx(chosen.scores, abs=1e-9)
    assert answer["confidence"] == pytest.approx(chosen.confidence, abs=1e-9)
    winner = candidates[chosen.index]
    assert (answer["chosen_draw"], answer["chosen_sample"]) == (winner["draw"], winner["sample"])
    assert answer["text"] == chosen.text and answer["answer"] == chosen.answer


# chrF as the utility: a soft one, under which the methods' scores differ
@pytest.mark.parametrize("method", sorted(mbr.METHODS))
def test_every_selection_method(client, method):
    body = {"prompt": PROMPT, "n_models": 2, "n_samples": 2, "max_tokens": 8, "seed": 3}
    answer = post(
        client, {**body, "selection": method, "utility": "chrf", "return_candidates": True}
    )
    assert answer["selection"] == method
    assert_selected_by(answer, method, "chrf")


@pytest.mark.parametrize("utility", sorted(mbr.UTILITIES))
def test_every_utility(client, utility):
    body = {"prompt": PROMPT, "n_models": 2, "n_samples": 2, "max_tokens": 8, "seed": 3}
    answer = post(
        client, {**body, "utility": utility, "selection": "flat", "return_candidates": True}
    )
    assert answer["utility"] == utility
    assert_selected_by(answer, "flat", utility)


# --- invalid input ------------------------------------------------------------------------------
BAD = [
    ({}, "prompt"),
    ({"max_tokens": 4}, "prompt"),
    ({"prompt": PROMPT, "messages": [{"role": "user", "content": "x"}]}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": PROMPT, "n_models": POOL_SIZE + 1}, "n_models"),
    ({"prompt": PROMPT, "n_models": -1}, "n_models"),
    ({"prompt": PROMPT, "n_samples": 0}, "n_samples"),
    ({"prompt": PROMPT, "n_models": 4, "n_samples": 17}, "max_candidates"),
    ({"prompt": PROMPT, "n_models": 0, "n_samples": 65}, "max_candidates"),
    ({"prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
    ({"prompt": PROMPT, "max_tokens": 481}, "max_tokens"),
    ({"prompt": PROMPT, "max_tokens": 480, "n_models": 1, "n_samples": 1}, "max_tokens"),
    ({"prompt": PROMPT, "temperature": -1}, "temperature"),
    ({"prompt": PROMPT, "top_p": 0}, "top_p"),
    ({"prompt": PROMPT, "seed": -5}, "seed"),
    ({"prompt": PROMPT, "stop": [""]}, "stop"),
    ({"prompt": 123}, "prompt"),
    ({"prompt": PROMPT, "n_models": "many"}, "n_models"),
    ({"prompt": PROMPT, "n_samples": 1.5}, "n_samples"),
    ({"prompt": PROMPT, "return_candidates": "maybe"}, "return_candidates"),
    ({"prompt": PROMPT, "temperature": "hot"}, "temperature"),
    ({"messages": "hi"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user"}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": "x", "nick": "me"}]}, "messages.0.nick"),
    ({"prompt": PROMPT, "foo": 1}, "foo"),
    ({"prompt": PROMPT, "n": 2}, "n"),
]


@pytest.mark.parametrize(("body", "field"), BAD, ids=[json.dumps(b)[:60] for b, _ in BAD])
def test_invalid_input_is_422_naming_the_field(client, body, field):
    error = post(client, body, status=422)["error"]
    assert error["code"] == 422 and error["type"] == "BadRequestError"
    assert field in error["message"], error
    if field not in ("prompt", "max_candidates"):
        assert error["param"] == field


@pytest.mark.parametrize(
    ("field", "value", "valid"),
    [("selection", "best", sorted(mbr.METHODS)), ("utility", "bertscore", sorted(mbr.UTILITIES))],
)
def test_unknown_selection_or_utility_lists_the_valid_names(client, field, value, valid):
    error = post(client, {"prompt": PROMPT, field: value}, status=422)["error"]
    assert error["param"] == field and value in error["message"]
    for name in valid:
        assert name in error["message"]


def test_malformed_json_unknown_model_and_routes(client):
    answer = client.post(
        "/generate", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert answer.status_code == 422 and "error" in answer.json()
    error = post(client, {"prompt": PROMPT, "model": "nope"}, status=404)["error"]
    assert error["param"] == "model" and "tiny" in error["message"]
    assert client.get("/nope").status_code == 404
    assert client.get("/generate").status_code == 405
    assert client.get("/health").status_code == 200  # still alive


# --- cancellation -----------------------------------------------------------------------------
def test_client_disconnect_aborts_its_engine_requests(live, client, engine):
    body = json.dumps(
        {
            "prompt": PROMPT,
            "n_models": POOL_SIZE,
            "n_samples": 16,
            "max_tokens": 450,
            "temperature": 1.0,
            "ignore_eos": True,
        }
    ).encode()
    aborted_before = engine.aborted_requests
    sock = socket.create_connection(("127.0.0.1", live.port))
    sock.sendall(
        b"POST /generate HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    deadline = time.monotonic() + 60
    while engine.num_unfinished_requests() < POOL_SIZE * 16:
        assert time.monotonic() < deadline, "the request never reached the engine"
        time.sleep(0.01)
    time.sleep(0.3)
    assert engine.num_unfinished_requests() == POOL_SIZE * 16  # still generating
    sock.close()  # the client goes away mid-request
    deadline = time.monotonic() + 5  # the full request takes ~25 s here
    while time.monotonic() < deadline and (
        engine.num_unfinished_requests() or engine.aborted_requests == aborted_before
    ):
        time.sleep(0.02)
    assert engine.num_unfinished_requests() == 0
    assert engine.aborted_requests - aborted_before == POOL_SIZE
    # and the engine serves the next request in full
    after = {"prompt": "hi", "n_models": 1, "n_samples": 1, "max_tokens": 2, "ignore_eos": True}
    assert post(client, after)["usage"]["completion_tokens"] == 2


def test_request_timeout_is_504_and_aborts(live, engine, tiny_settings):
    state = live.app.state.engine_state
    settings = tiny_settings.model_copy(update={"request_timeout_s": 0.5})
    service = GenerationService(settings, state.require, Admission(1, 0), Metrics())
    from ivonserve.server.generate.protocol import GenerateRequest

    request = GenerateRequest(
        prompt=PROMPT, n_models=2, n_samples=8, max_tokens=450, temperature=1.0, ignore_eos=True
    )

    async def run() -> None:
        await service.run(service.plan_generate(request), service.admit(), {})

    with pytest.raises(RequestTimeout) as err:
        live.run(run())
    assert api_error(err.value).status == 504
    time.sleep(0.1)
    assert engine.num_unfinished_requests() == 0
    assert service.admission.in_flight == 0  # the slot came back


def test_serve_refuses_a_missing_posterior_in_one_line(tmp_path, capsys):
    code = cli.main(["serve", "--posterior", str(tmp_path / "none"), "--port", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "does not exist" in err and "Traceback" not in err


def test_vllm_sampling_extensions_apply_to_every_draw(client, engine):
    """vLLM's own extensions (its OpenAI server takes them) reach every draw's request."""
    base = {"prompt": PROMPT, "n_models": 2, "n_samples": 2, "max_tokens": 8, "seed": 3,
            "return_candidates": True, "ignore_eos": True}  # fmt: skip
    greedy = post(client, {**base, "temperature": 0})["candidates"]
    top1 = post(client, {**base, "temperature": 1.0, "top_k": 1})["candidates"]
    assert [c["text"] for c in top1] == [c["text"] for c in greedy]  # top_k=1 is greedy
    token = engine.encode(" clips")[0]
    forced = post(client, {**base, "temperature": 1.0, "logit_bias": {str(token): 100}})
    word = engine.tokenizer.decode([token])
    assert all(c["text"] == word * 8 for c in forced["candidates"])
    stopped = post(client, {**base, "logit_bias": {str(token): 100}, "ignore_eos": False,
                            "stop_token_ids": [token], "temperature": 1.0})  # fmt: skip
    assert all(c["finish_reason"] == "stop" and c["tokens"] == 1 for c in stopped["candidates"])
    accepted = [
        {"repetition_penalty": 1.3},
        {"min_p": 0.1},
        {"presence_penalty": 0.5},
        {"frequency_penalty": 0.5},
        {"min_tokens": 4},
        {"top_k": -1},
        {"skip_special_tokens": False},
        {"include_stop_str_in_output": True},
    ]
    for extra in accepted:  # fmt: skip
        post(client, {**base, **extra})
    for body, field in (({"best_of": 2}, "best_of"), ({"repetition_penalty": 0}, "repetition"),
                        ({"min_tokens": 20}, "min_tokens"), ({"logit_bias": {"x": 1}}, "logit"),
                        ({"stop_token_ids": [10**7]}, "stop_token_ids"),
                        ({"logit_bias": {str(10**7): 1}}, "logit_bias"),
                        ({"top_k": 2**64}, "top_k")):  # fmt: skip
        answer = client.post("/generate", json={**base, **body})
        assert answer.status_code == 422, (body, answer.text)
        assert field in answer.json()["error"]["message"], answer.text
    # OpenAI's routes take the same extensions (vLLM's benchmark client sends repetition_penalty)
    raw = {"prompt": PROMPT, "max_tokens": 8, "seed": 3, "n_models": 2, "n_samples": 2,
           "return_candidates": True, "ignore_eos": True}  # fmt: skip
    answer = client.post("/v1/completions", json={**raw, "temperature": 0})
    greedy = [c["text"] for c in answer.json()["ivonserve"]["candidates"]]
    answer = client.post("/v1/completions", json={**raw, "top_k": 1, "repetition_penalty": 1.0})
    assert answer.status_code == 200, answer.text
    assert [c["text"] for c in answer.json()["ivonserve"]["candidates"]] == greedy
    answer = client.post("/v1/completions", json={**raw, "best_of": 2})
    assert answer.status_code == 422 and "best_of" in answer.json()["error"]["message"]
