"""Admission control (server/limits.py) on its own: slots, the first-come queue, refusals with a
retry estimate, cancellation while queued, draining."""

from __future__ import annotations

import asyncio

import pytest

from ivonserve.server.limits import Admission, Overloaded


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
