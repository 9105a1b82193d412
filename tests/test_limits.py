"""Every limit (server/limits.py) on its own, without vLLM: admission (slots, the first-come
queue, refusals with a retry estimate, cancellation while queued, draining), then each request
limit with its one status, the body and the deadline, and the pool a limit is checked against."""

from __future__ import annotations

import asyncio

import pytest
from conftest import fake_pool

from ivonserve.config import Settings
from ivonserve.errors import BodyTooLarge, InvalidRequest, RequestTimeout, api_error
from ivonserve.pool import PosteriorSpec
from ivonserve.server.limits import Admission, Limits, Overloaded, check_body_size

K = 4
CONTEXT = 64
VOCAB = 100


def run(coro):
    return asyncio.run(coro)


def test_slots_then_queue_then_429_with_a_retry_estimate():
    async def scenario():
        admission = Admission(max_in_flight=2, max_queued=1)
        first, second = admission.enter(), admission.enter()
        assert first.admitted and second.admitted and admission.in_flight == 2
        queued = admission.enter()
        assert not queued.admitted and admission.queued == 1
        with pytest.raises(Overloaded) as refused:
            admission.enter()
        assert refused.value.status == 429 and refused.value.retry_after_s >= 1
        assert "max_in_flight 2" in str(refused.value) and "max_queued 1" in str(refused.value)
        first.release()  # the slot goes straight to the queued ticket
        await asyncio.wait_for(queued.wait(), 1)
        assert queued.admitted and admission.in_flight == 2 and admission.queued == 0
        for ticket in (second, queued):
            ticket.release()
        assert admission.in_flight == 0

    run(scenario())


def test_first_come_first_served_and_release_is_idempotent():
    async def scenario():
        admission = Admission(max_in_flight=1, max_queued=3)
        holder = admission.enter()
        waiters = [admission.enter() for _ in range(3)]
        order = []

        async def take(i, ticket):
            async with ticket:
                order.append(i)
                await asyncio.sleep(0)

        tasks = [asyncio.create_task(take(i, t)) for i, t in enumerate(waiters)]
        await asyncio.sleep(0)
        holder.release()
        holder.release()  # twice: no second slot appears
        await asyncio.gather(*tasks)
        assert order == [0, 1, 2]
        assert admission.in_flight == 0 and admission.queued == 0

    run(scenario())


def test_a_cancelled_waiter_gives_its_queue_place_back():
    async def scenario():
        admission = Admission(max_in_flight=1, max_queued=1)
        holder = admission.enter()
        queued = admission.enter()

        async def wait_in_line():
            async with queued:
                pass

        task = asyncio.create_task(wait_in_line())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert admission.queued == 0
        again = admission.enter()  # the place is free again
        holder.release()
        await asyncio.wait_for(again.wait(), 1)
        again.release()
        assert admission.in_flight == 0

    run(scenario())


def test_draining_refuses_with_503_and_retry_after_tracks_service_time():
    async def scenario():
        admission = Admission(max_in_flight=1, max_queued=4)
        for _ in range(20):
            admission.record_service(10.0)
        held = admission.enter()
        for _ in range(3):
            admission.enter()
        assert admission.retry_after_s() >= 30  # ~10 s a round, 4 rounds ahead
        admission.draining = True
        with pytest.raises(Overloaded) as refused:
            admission.enter()
        assert refused.value.status == 503
        held.release()

    run(scenario())


# --- the pool ---------------------------------------------------------------------------------
def test_a_pool_gives_the_mean_or_its_first_draws_and_refuses_past_its_size():
    pool = fake_pool(size=K)
    assert pool.size == K and pool.loras == ["tiny/mean", *pool.draws]
    assert pool.adapters(0) == [(None, "tiny/mean")]
    assert pool.adapters(2) == [(0, "tiny/d0"), (1, "tiny/d1")]
    with pytest.raises(ValueError, match="pool size"):  # a caller's bug: limits checked it
        pool.adapters(K + 1)
    spec = PosteriorSpec.parse("math=/p/a")
    assert (spec.name, str(spec.path), spec.kind) == ("math", "/p/a", "posterior")


# --- every limit, once, with one status ---------------------------------------------------------
def test_each_limit_resolves_its_default_and_refuses_with_a_422_naming_the_field():
    limits = Limits(
        Settings.build(default_n_models=6, max_candidates=8, max_tokens_limit=32,
                       default_max_tokens=8, max_prompt_tokens=16, max_continuations=2)
    )  # fmt: skip
    pool = fake_pool(size=K)
    assert limits.n_draws(None, pool) == K  # the default, capped at the pool
    assert limits.n_draws(0, pool) == 0 and limits.n_draws(K, pool) == K
    assert limits.n_samples(None, 0) == 4 and limits.max_tokens(None) == 8
    refused = [
        (lambda: limits.n_draws(K + 1, pool), "n_models",
         "n_models: must be <= the pool size 4, got 5"),
        (lambda: limits.n_samples(3, 3), "n_samples",
         "n_samples: max(1, n_models) * n_samples = 9 candidates exceeds max_candidates 8"),
        (lambda: limits.max_tokens(33), "max_tokens", "max_tokens: must be <= 32, got 33"),
        (lambda: limits.prompt([1] * 17, "messages", CONTEXT), "messages",
         "messages: the prompt is 17 tokens, over the limit of 16 (max_prompt_tokens / the "
         "context length)"),
        (lambda: limits.context([], 4, CONTEXT), "prompt", "prompt: the prompt is empty"),
        (lambda: limits.context([1] * 10, 60, CONTEXT), "max_tokens",
         "max_tokens: prompt (10 tokens) + max_tokens (60) = 70 exceeds the context length 64"),
        (lambda: limits.token_ids([3, VOCAB], VOCAB, "stop_token_ids"), "stop_token_ids",
         "stop_token_ids: token ids are below the vocabulary size 100"),
        (lambda: limits.scored([[1], [2], [3]], "continuations", CONTEXT), "continuations",
         "continuations: 3 texts to score exceed max_continuations 2"),
    ]  # fmt: skip
    for check, field, message in refused:
        with pytest.raises(InvalidRequest) as err:
            check()
        error = api_error(err.value)
        assert (error.status, error.param, error.message) == (422, field, message)
    unlimited = Limits(Settings.build(max_prompt_tokens=None))
    unlimited.prompt([1] * (CONTEXT - 1), "prompt", CONTEXT)  # the default: the context - 1
    with pytest.raises(InvalidRequest):
        unlimited.prompt([1] * CONTEXT, "prompt", CONTEXT)


def test_the_body_and_the_deadline_are_limits_too():
    check_body_size(1024, 1024)
    with pytest.raises(BodyTooLarge) as err:
        check_body_size(1025, 1024)
    assert api_error(err.value).status == 413 and api_error(err.value).param == "body"

    async def slow() -> None:
        async with Limits(Settings.build(request_timeout_s=0.01)).deadline("request"):
            await asyncio.sleep(1)

    with pytest.raises(RequestTimeout) as late:
        asyncio.run(slow())
    assert api_error(late.value).status == 504 and "request_timeout_s=0.01" in str(late.value)
