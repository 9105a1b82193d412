"""Every limit a request meets, each checked once, here, with one status per fault
(``ivonserve.errors``):

* admission (``Admission``): at most ``max_in_flight`` requests on the engine, at most
  ``max_queued`` waiting behind them (first come, first served), ``Overloaded`` (429 with
  ``Retry-After``) past both, ``ShuttingDown`` (503) while draining. vLLM would accept any
  number of requests and let every one of them slow down; a bounded queue keeps latency
  predictable and tells clients when to come back instead;
* the time a request may take, queue included (``Limits.deadline``: ``RequestTimeout``, 504);
* the body's size (``check_body_size``: ``BodyTooLarge``, 413; the middleware reads the body);
* what a request asks for (``Limits``): n_models against the pool's size K, the candidates
  (``max_candidates``), ``max_tokens``, the prompt's length (``max_prompt_tokens``, the
  context), token ids against the vocabulary, the texts of one scoring request
  (``max_continuations``): ``InvalidRequest`` (422) naming the field.

The engine trusts what passed here: it neither re-resolves nor re-checks it.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from ivonserve.errors import (
    BodyTooLarge,
    InvalidRequest,
    Overloaded,
    RequestTimeout,
    ShuttingDown,
)

if TYPE_CHECKING:
    from ivonserve.config import Settings
    from ivonserve.pool import Pool

__all__ = [
    "Admission",
    "BodyTooLarge",
    "Limits",
    "Overloaded",
    "ShuttingDown",
    "Ticket",
    "check_body_size",
]


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
            raise ShuttingDown("the server is shutting down", self.retry_after_s())
        ticket = Ticket(self)
        if self.in_flight < self.max_in_flight and not self._waiting:
            self.in_flight += 1
            ticket._slot.set_result(None)
        elif len(self._waiting) < self.max_queued:
            self._waiting.append(ticket)
        else:
            raise Overloaded(
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


def check_body_size(size: int, max_body_bytes: int) -> None:
    """A body (as declared, or as read so far) within ``max_body_bytes``."""
    if size > max_body_bytes:
        raise BodyTooLarge(f"the request body exceeds max_body_bytes={max_body_bytes}")


class Limits:
    """What one request may ask for, from the settings; each method resolves a default where
    the request leaves it out and checks the limit once."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def n_draws(self, requested: int | None, pool: Pool) -> int:
        """The wire's n_models: the request's (at most the pool size K), or the server default
        capped at K."""
        if requested is None:
            return min(self.settings.default_n_models, pool.size)
        if requested > pool.size:
            raise InvalidRequest(
                "n_models", f"must be <= the pool size {pool.size}, got {requested}"
            )
        return requested

    def n_samples(self, requested: int | None, n_draws: int) -> int:
        """The request's n_samples (or the default), with max(1, n_models) * n_samples
        candidates at most ``max_candidates``."""
        s = self.settings
        n_samples = requested if requested is not None else s.default_n_samples
        count = max(1, n_draws) * n_samples
        if count > s.max_candidates:
            raise InvalidRequest(
                "n_samples",
                f"max(1, n_models) * n_samples = {count} candidates exceeds "
                f"max_candidates {s.max_candidates}",
            )
        return n_samples

    def max_tokens(self, requested: int | None) -> int:
        """The request's max_tokens (or the default), at most ``max_tokens_limit``."""
        s = self.settings
        max_tokens = requested if requested is not None else s.default_max_tokens
        if max_tokens > s.max_tokens_limit:
            raise InvalidRequest("max_tokens", f"must be <= {s.max_tokens_limit}, got {max_tokens}")
        return max_tokens

    def prompt(self, prompt_ids: Sequence[int], field: str, context: int) -> None:
        """A prompt within ``max_prompt_tokens`` (default: the context length - 1)."""
        limit = self.settings.max_prompt_tokens or context - 1
        if len(prompt_ids) > limit:
            raise InvalidRequest(
                field,
                f"the prompt is {len(prompt_ids)} tokens, over the limit of {limit} "
                "(max_prompt_tokens / the context length)",
            )

    @staticmethod
    def context(prompt_ids: Sequence[int], max_tokens: int, context: int) -> None:
        """A prompt that is not empty, and prompt + max_tokens within the context length."""
        if not prompt_ids:
            raise InvalidRequest("prompt", "the prompt is empty")
        total = len(prompt_ids) + max_tokens
        if total > context:
            raise InvalidRequest(
                "max_tokens",
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) = "
                f"{total} exceeds the context length {context}",
            )

    def scored(self, sequences: Sequence[Sequence[int]], field: str, context: int) -> None:
        """The texts of one scoring request: at most ``max_continuations``, each a prompt
        within the limits with room for the one token vLLM decodes."""
        if len(sequences) > self.settings.max_continuations:
            raise InvalidRequest(
                field,
                f"{len(sequences)} texts to score exceed max_continuations "
                f"{self.settings.max_continuations}",
            )
        for sequence in sequences:
            self.prompt(sequence, field, context)
            self.context(sequence, 1, context)

    @staticmethod
    def token_ids(ids: Sequence[int], vocab: int, field: str) -> None:
        """Token ids the request gives: each below the vocabulary size."""
        if any(t >= vocab for t in ids):
            raise InvalidRequest(field, f"token ids are below the vocabulary size {vocab}")

    @asynccontextmanager
    async def deadline(self, what: str) -> AsyncIterator[None]:
        """At most ``request_timeout_s`` for what runs inside (queue time included)."""
        timeout_s = self.settings.request_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                yield
        except TimeoutError:
            raise RequestTimeout(
                f"the {what} took longer than request_timeout_s={timeout_s}"
            ) from None
