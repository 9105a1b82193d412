"""Admission control: at most ``max_in_flight`` generation requests on the engine, at most
``max_queued`` waiting behind them (first come, first served), and a 429 with ``Retry-After``
past both. vLLM would accept any number of requests and let every one of them slow down; a
bounded queue keeps latency predictable and tells clients when to come back instead.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque


class Overloaded(Exception):
    """Every slot and every queue place is taken (429), or the server is draining (503)."""

    def __init__(self, status: int, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s


class Ticket:
    """One request's place: admitted at once, or queued until a slot frees up."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._slot: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._released = False

    @property
    def admitted(self) -> bool:
        return self._slot.done() and not self._slot.cancelled()

    async def wait(self) -> None:
        """Until this request holds a slot (cancelling it gives the queue place up)."""
        await self._slot

    def release(self) -> None:
        """Give the slot (or the queue place) back; safe to call more than once."""
        if not self._released:
            self._released = True
            self._admission._leave(self)

    async def __aenter__(self) -> Ticket:
        try:
            await self.wait()
        except BaseException:
            self.release()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()


class Admission:
    """The counters behind the limits, and an estimate of when a refused client should retry."""

    def __init__(self, max_in_flight: int, max_queued: int) -> None:
        self.max_in_flight = max_in_flight
        self.max_queued = max_queued
        self.in_flight = 0
        self.draining = False
        self._waiting: deque[Ticket] = deque()
        self._service_s = 1.0  # moving average of one request's time on the engine

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def enter(self) -> Ticket:
        """A ticket holding a slot or a queue place; ``Overloaded`` when there is neither."""
        if self.draining:
            raise Overloaded(503, "the server is shutting down", self.retry_after_s())
        ticket = Ticket(self)
        if self.in_flight < self.max_in_flight and not self._waiting:
            self.in_flight += 1
            ticket._slot.set_result(None)
        elif len(self._waiting) < self.max_queued:
            self._waiting.append(ticket)
        else:
            raise Overloaded(
                429,
                f"too many requests: {self.in_flight} in flight (max_in_flight "
                f"{self.max_in_flight}) and {len(self._waiting)} queued (max_queued "
                f"{self.max_queued})",
                self.retry_after_s(),
            )
        return ticket

    def record_service(self, seconds: float) -> None:
        self._service_s = 0.8 * self._service_s + 0.2 * seconds

    def retry_after_s(self) -> int:
        """Seconds until the queue has likely moved on by one place (at least 1)."""
        rounds = (len(self._waiting) + 1) / self.max_in_flight
        return max(1, min(600, math.ceil(self._service_s * rounds)))

    def _leave(self, ticket: Ticket) -> None:
        if ticket in self._waiting:  # gave up while queued: the place goes, no slot was held
            self._waiting.remove(ticket)
            ticket._slot.cancel()
            return
        if not ticket.admitted:
            return
        while self._waiting:  # hand the slot straight to the next live waiter
            successor = self._waiting.popleft()
            if not successor._slot.done():
                successor._slot.set_result(None)
                return
        self.in_flight -= 1
