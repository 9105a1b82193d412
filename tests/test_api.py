"""The production API over real HTTP on the shared tiny engine: the OpenAI client (sync and
async, streamed and not), the /generate progress stream, several posteriors, /metrics, limits
and back-pressure, API keys, CORS, request ids and access logs, cancellation and draining."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
from conftest import POOL_SIZE
from prometheus_client.parser import text_string_to_metric_families

from ivonserve.server import start_draining

PROMPT = "Natalia sold 48 clips in April and half as many in May. How many clips did she sell?"
MESSAGES = [{"role": "user", "content": PROMPT}]
LONG = {"prompt": PROMPT, "temperature": 1.0, "ignore_eos": True}  # + n_models/n_samples/tokens


def scrape(url: str, headers: dict | None = None) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics, parsed with prometheus-client's own parser."""
    text = httpx.get(f"{url}/metrics", headers=headers, timeout=30).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for(condition, timeout: float = 60, what: str | Callable[[], str] = "it") -> None:
    """Poll ``condition``; ``what`` (or what it returns, read at the timeout) names it."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what() if callable(what) else what}")
        time.sleep(0.02)


def in_background(url: str, path: str, body: dict, **kwargs: Any) -> tuple[threading.Thread, dict]:
    """POST in a thread; the result dict gets the response (or the exception)."""
    result: dict[str, Any] = {}

    def call() -> None:
        try:
            result["response"] = httpx.post(f"{url}{path}", json=body, timeout=300, **kwargs)
        except httpx.HTTPError as err:
            result["error"] = err

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    return thread, result


def sse_events(response: httpx.Response) -> list[Any]:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


# --- the OpenAI client ----------------------------------------------------------------------
def test_openai_chat_sync_streamed_equals_not_streamed(live):
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="none", max_retries=0)
    kwargs = {
        "model": "tiny",
        "messages": MESSAGES,
        "max_tokens": 8,
        "seed": 5,
        "temperature": 1.0,
        "extra_body": {"n_models": 2, "n_samples": 2, "return_candidates": True},
    }
    reply = client.chat.completions.create(**kwargs)
    assert reply.object == "chat.completion" and reply.model == "tiny"
    (choice,) = reply.choices
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    info = reply.model_extra["ivonserve"]
    texts = [c["text"] for c in info["candidates"]]
    assert len(texts) == 4 and info["n_models"] == 2 and info["n_samples"] == 2
    chosen = next(
        c
        for c in info["candidates"]
        if (c["draw"], c["sample"]) == (info["chosen_draw"], info["chosen_sample"])
    )
    assert choice.message.content == chosen["text"]
    assert 0 <= info["confidence"] <= 1 and info["seed"] == 5
    assert reply.usage.completion_tokens == sum(c["tokens"] for c in info["candidates"])

    chunks = list(
        client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert {c.id for c in chunks} == {chunks[0].id}
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content  # same seed: same candidates, same consensus
    (last,) = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert last.choices[0].finish_reason == choice.finish_reason
    assert last.model_extra["ivonserve"]["confidence"] == info["confidence"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == (
        reply.usage.completion_tokens
    )


def test_openai_async_completions_streamed_equals_not_streamed(live):
    async def run() -> tuple[Any, list[Any]]:
        client = openai.AsyncOpenAI(base_url=f"{live.url}/v1", api_key="none", max_retries=0)
        kwargs = {
            "model": "tiny",
            "prompt": "Question: 2 + 3 = ? Answer:",
            "max_tokens": 8,
            "seed": 3,
            "extra_body": {"n_models": 3, "n_samples": 1, "selection": "flat"},
        }
        reply = await client.completions.create(**kwargs)
        stream = await client.completions.create(**kwargs, stream=True)
        chunks = [chunk async for chunk in stream]
        await client.close()
        return reply, chunks

    reply, chunks = asyncio.run(run())
    assert reply.object == "text_completion" and reply.model == "tiny"
    info = reply.model_extra["ivonserve"]
    assert info["selection"] == "flat" and info["n_models"] == 3 and info["candidates"] is None
    assert "".join(c.choices[0].text for c in chunks if c.choices) == reply.choices[0].text
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason
    opening = chunks[0].choices[0]  # sent at once, before the candidates are generated
    assert opening.text == "" and opening.finish_reason is None


def test_openai_models_and_errors(live):
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="none", max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny", "tiny-mean"]
    with pytest.raises(openai.NotFoundError, match="tiny-mean"):
        client.chat.completions.create(model="nope", messages=MESSAGES, max_tokens=2)
    with pytest.raises(openai.UnprocessableEntityError, match="n_models"):
        client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=2, extra_body={"n_models": POOL_SIZE + 1}
        )
    with pytest.raises(openai.UnprocessableEntityError, match="n: "):
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, n=2)
    with pytest.raises(openai.UnprocessableEntityError, match="prompt"):
        client.completions.create(model="tiny", prompt=["a", "b"], max_tokens=2)


def test_no_model_means_the_first_and_the_adapter_pool_is_the_adapter(client, hf, tiny_posterior):
    """The second pool serves the tiny posterior's mean as a plain adapter: every draw is that
    adapter, unpruned, so greedy decoding equals peft's on the folder."""
    body = {
        "prompt": PROMPT,
        "n_models": 2,
        "n_samples": 1,
        "temperature": 0,
        "max_tokens": 8,
        "ignore_eos": True,
        "return_candidates": True,
    }
    assert client.post("/generate", json=body).json()["model"] == "tiny"
    answer = client.post("/generate", json={**body, "model": "tiny-mean"}).json()
    assert answer["model"] == "tiny-mean"
    expected = hf.decode(hf.greedy(tiny_posterior, hf.prompt_ids(PROMPT), 8))
    assert [c["text"] for c in answer["candidates"]] == [expected, expected]


# --- streams ----------------------------------------------------------------------------------
def test_generate_progress_stream_sends_each_draw_then_the_result(client):
    body = {
        "prompt": PROMPT,
        "n_models": 3,
        "n_samples": 2,
        "max_tokens": 8,
        "seed": 1,
        "stream": True,
        "return_candidates": True,
    }
    with client.stream("POST", "/generate", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    progress = [e for e in events[:-1] if e["type"] == "candidates"]
    (result,) = [e["result"] for e in events[:-1] if e["type"] == "result"]
    assert sorted({c["draw"] for e in progress for c in e["candidates"]}) == [0, 1, 2]
    assert all(len({c["draw"] for c in e["candidates"]}) == 1 for e in progress)
    streamed = sorted(
        (c["draw"], c["sample"], c["text"]) for e in progress for c in e["candidates"]
    )
    final = sorted((c["draw"], c["sample"], c["text"]) for c in result["candidates"])
    assert streamed == final and len(final) == 6
    assert result["text"] in {c[2] for c in final}


def test_stream_disconnect_aborts_the_fan_out(live, engine):
    before = scrape(live.url)
    aborted = engine.aborted_requests
    body = {
        **LONG,
        "messages": MESSAGES,
        "model": "tiny",
        "max_tokens": 450,
        "stream": True,
        "n_models": POOL_SIZE,
        "n_samples": 8,
    }
    body.pop("prompt")
    url = f"{live.url}/v1/chat/completions"
    with httpx.stream("POST", url, json=body, timeout=60) as response:
        lines = response.iter_lines()  # kept: dropping the iterator would close the stream
        assert '"role":"assistant"' in next(lines)
        wait_for(
            lambda: engine.num_unfinished_requests() == POOL_SIZE * 8,
            what=lambda: (
                f"the fan-out: {engine.num_unfinished_requests()} engine requests, "
                f"{live.app.state.admission.in_flight} in flight"
            ),
        )
    # leaving the block closed the connection mid-stream
    wait_for(lambda: engine.num_unfinished_requests() == 0, timeout=10, what="the abort")
    assert engine.aborted_requests - aborted == POOL_SIZE
    after = scrape(live.url)
    assert metric(after, "ivonserve_client_disconnects_total") == (
        metric(before, "ivonserve_client_disconnects_total") + 1
    )
    assert metric(after, "ivonserve_aborted_engine_requests_total") >= POOL_SIZE
    assert metric(after, "ivonserve_requests_in_flight") == 0


# --- metrics, request ids, logs ---------------------------------------------------------------
def test_metrics_parse_and_move_with_each_request(live, client):
    before = scrape(live.url)
    body = {"prompt": PROMPT, "n_models": 2, "n_samples": 2, "max_tokens": 4}
    answer = client.post("/generate", json=body).json()
    client.post("/generate", json={"prompt": PROMPT, "n_samples": 0})
    client.get("/no/such/path")
    after = scrape(live.url)

    def moved(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert moved("ivonserve_requests_total", route="/generate", status="200") == 1
    assert moved("ivonserve_requests_total", route="/generate", status="422") == 1
    assert moved("ivonserve_requests_total", route="other", status="404") == 1
    assert moved("ivonserve_candidates_total", model="tiny") == 4
    assert (
        moved("ivonserve_generated_tokens_total", model="tiny")
        == (answer["usage"]["completion_tokens"])
    )
    assert moved("ivonserve_prompt_tokens_total", model="tiny") == answer["usage"]["prompt_tokens"]
    for phase in ("queue", "generate", "select"):
        assert moved("ivonserve_phase_duration_seconds_count", phase=phase) == 1
    assert moved("ivonserve_confidence_count", model="tiny") == 1
    assert moved("ivonserve_request_duration_seconds_count", route="/generate") == 2
    assert metric(after, "ivonserve_pool_size", model="tiny") == POOL_SIZE
    assert metric(after, "ivonserve_pool_size", model="tiny-mean") == POOL_SIZE
    assert metric(after, "ivonserve_requests_in_flight") == 0
    assert metric(after, "ivonserve_requests_queued") == 0
    assert metric(after, "ivonserve_engine_ready") == 1
    assert metric(after, "process_resident_memory_bytes") > 0


def test_request_id_is_echoed_and_logged_as_one_line(client, caplog):
    caplog.set_level(logging.INFO, logger="ivonserve.access")
    body = {"prompt": PROMPT, "n_models": 2, "n_samples": 1, "max_tokens": 4}
    answer = client.post("/generate", json=body, headers={"X-Request-Id": "trace-42"})
    assert answer.headers["x-request-id"] == "trace-42"
    for unusable in ("two words", "x" * 200):
        made_up = client.post("/generate", json=body, headers={"X-Request-Id": unusable})
        assert len(made_up.headers["x-request-id"]) == 32  # replaced by a fresh one
    assert client.get("/health").headers["x-request-id"]
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "ivonserve.access"]
    (line,) = [x for x in lines if x["id"] == "trace-42"]
    assert line["route"] == "/generate" and line["status"] == 200 and line["model"] == "tiny"
    assert line["n_models"] == 2 and line["n_samples"] == 1
    assert line["completion_tokens"] == answer.json()["usage"]["completion_tokens"]
    for key in ("queue_s", "generate_s", "select_s", "total_s", "prompt_tokens", "confidence"):
        assert key in line


# --- limits -----------------------------------------------------------------------------------
def test_past_in_flight_and_queue_limits_is_429_with_retry_after(serve_with):
    srv = serve_with(max_in_flight=1, max_queued=1)
    body = {**LONG, "n_models": 1, "n_samples": 2, "max_tokens": 200}
    first, first_result = in_background(srv.url, "/generate", body)
    wait_for(lambda: metric(scrape(srv.url), "ivonserve_requests_in_flight") == 1, what="slot")
    second, second_result = in_background(srv.url, "/generate", body)
    wait_for(lambda: metric(scrape(srv.url), "ivonserve_requests_queued") == 1, what="queue")
    refused = httpx.post(f"{srv.url}/generate", json=body, timeout=30)
    assert refused.status_code == 429
    assert int(refused.headers["retry-after"]) >= 1
    error = refused.json()["error"]
    assert error["type"] == "RateLimitError"
    assert "max_in_flight 1" in error["message"] and "max_queued 1" in error["message"]
    stream = {"messages": MESSAGES, "max_tokens": 4, "stream": True}
    assert httpx.post(f"{srv.url}/v1/chat/completions", json=stream).status_code == 429
    first.join(300)
    second.join(300)
    assert first_result["response"].status_code == 200
    assert second_result["response"].status_code == 200  # queued, then served: nothing lost
    assert second_result["response"].json()["timing"]["queue_s"] > 0
    samples = scrape(srv.url)
    assert metric(samples, "ivonserve_requests_total", route="/generate", status="429") == 1
    assert metric(samples, "ivonserve_requests_in_flight") == 0
    assert metric(samples, "ivonserve_requests_queued") == 0


def test_body_prompt_and_token_limits_name_the_limit(serve_with):
    srv = serve_with(max_body_bytes=1024, max_prompt_tokens=16, max_tokens_limit=32)
    big = {"prompt": "x" * 2000}
    too_big = httpx.post(f"{srv.url}/generate", json=big)
    assert too_big.status_code == 413 and "max_body_bytes=1024" in too_big.text
    chunked = httpx.post(
        f"{srv.url}/generate",
        content=iter([json.dumps(big).encode()[:1000], json.dumps(big).encode()[1000:]]),
        headers={"content-type": "application/json"},
    )
    assert chunked.status_code == 413 and chunked.json()["error"]["param"] == "body"
    words = {"prompt": " ".join(["seven"] * 40), "max_tokens": 4}
    long_prompt = httpx.post(f"{srv.url}/generate", json=words)
    assert long_prompt.status_code == 422 and long_prompt.json()["error"]["param"] == "prompt"
    assert "max_prompt_tokens" in long_prompt.text
    chat = {"messages": [{"role": "user", "content": words["prompt"]}], "max_tokens": 4}
    long_chat = httpx.post(f"{srv.url}/v1/chat/completions", json=chat)
    assert long_chat.status_code == 422 and long_chat.json()["error"]["param"] == "messages"
    too_many = httpx.post(f"{srv.url}/v1/completions", json={"prompt": "hi", "max_tokens": 33})
    assert too_many.status_code == 422 and "max_tokens: must be <= 32" in too_many.text


def test_request_timeout_over_http_is_504_and_aborts(serve_with, engine):
    srv = serve_with(request_timeout_s=0.5)
    body = {**LONG, "n_models": 2, "n_samples": 4, "max_tokens": 450}
    answer = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=60)
    assert answer.status_code == 504 and "request_timeout_s=0.5" in answer.text
    wait_for(lambda: engine.num_unfinished_requests() == 0, timeout=10, what="the abort")
    assert metric(scrape(srv.url), "ivonserve_requests_in_flight") == 0


# --- access -----------------------------------------------------------------------------------
def test_api_keys_guard_everything_but_the_probes(serve_with, tmp_path):
    key_file = tmp_path / "keys"
    key_file.write_text("# one key per line\nsecond-key\n\n")
    srv = serve_with(api_keys=["first-key"], api_key_file=key_file)
    with httpx.Client(base_url=srv.url, timeout=60) as http:
        assert http.get("/health").status_code == 200
        assert http.get("/ready").status_code == 200
        missing = http.get("/v1/models")
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert missing.json()["error"]["type"] == "AuthenticationError"
        for header in ("Bearer wrong", "Basic first-key", "Bearer", "first-key", "Bearer first"):
            assert http.get("/v1/models", headers={"Authorization": header}).status_code == 401
        assert http.get("/metrics").status_code == 401
        for key in ("first-key", "second-key"):
            ok = http.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
            assert ok.status_code == 200
    good = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="second-key", max_retries=0)
    assert good.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2).choices
    bad = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)


def test_cors_is_off_unless_configured(client, serve_with):
    preflight = {
        "Origin": "https://app.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    off = client.options("/v1/chat/completions", headers=preflight)
    assert "access-control-allow-origin" not in off.headers
    srv = serve_with(cors_origins=["https://app.example"], api_keys=["k"])
    on = httpx.options(f"{srv.url}/v1/chat/completions", headers=preflight)
    assert on.status_code == 200  # a preflight needs no key
    assert on.headers["access-control-allow-origin"] == "https://app.example"
    other = httpx.options(
        f"{srv.url}/v1/chat/completions", headers={**preflight, "Origin": "https://evil.example"}
    )
    assert "access-control-allow-origin" not in other.headers


# --- draining -----------------------------------------------------------------------------------
def test_drain_lets_in_flight_finish_and_refuses_new_work(serve_with, engine):
    srv = serve_with(drain_timeout_s=120)
    body = {**LONG, "n_models": 1, "n_samples": 2, "max_tokens": 200}
    thread, result = in_background(srv.url, "/generate", body)
    wait_for(lambda: metric(scrape(srv.url), "ivonserve_requests_in_flight") == 1, what="slot")
    start_draining(srv.app)
    srv.server.should_exit = True  # what SIGTERM does (the real signal: tests/test_e2e.py)
    wait_for(
        lambda: not srv.server.servers or all(not s.is_serving() for s in srv.server.servers),
        what="the listener to close",
    )
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{srv.url}/health", timeout=5)
    thread.join(300)
    assert result["response"].status_code == 200  # accepted before the signal: completed
    srv.done.result(60)


def test_drain_deadline_aborts_what_is_left(serve_with, engine):
    srv = serve_with(drain_timeout_s=0.5)
    body = {**LONG, "n_models": 2, "n_samples": 4, "max_tokens": 450}
    thread, result = in_background(srv.url, "/generate", body)
    wait_for(lambda: engine.num_unfinished_requests() == 8, what="the fan-out")
    start_draining(srv.app)
    srv.server.should_exit = True
    srv.done.result(60)
    thread.join(60)
    refused = result["response"]
    assert refused.status_code == 503 and "drain_timeout_s=0.5" in refused.text
    assert refused.headers["retry-after"]
    wait_for(lambda: engine.num_unfinished_requests() == 0, timeout=10, what="the abort")
