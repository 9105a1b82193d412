"""What every engine route's service shares (vLLM's ``OpenAIServing`` pattern): the settings and
their limits, admission, the timeout (queue time included), the engine, and turning a request's
prompt into token ids. ``generate/``, ``score/`` and ``openai/`` build on ``Service``.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from ivonserve.config import Settings
from ivonserve.engine import Engine
from ivonserve.errors import InvalidRequest
from ivonserve.server.limits import Admission, Limits, Ticket
from ivonserve.server.metrics import Metrics
from ivonserve.server.protocol import ChatMessage, Usage

T = TypeVar("T")


@dataclass(frozen=True)
class EngineRun:
    """What ``Service.on_engine`` measured: the work's result, its queue and engine seconds."""

    result: Any
    began: float
    queue_s: float
    engine_s: float


class Service:
    """What every engine route shares: limits, admission, the timeout, the engine."""

    def __init__(
        self,
        settings: Settings,
        require_engine: Callable[[], Engine],
        admission: Admission,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.limits = Limits(settings)
        self.require_engine = require_engine
        self.admission = admission
        self.metrics = metrics

    def admit(self) -> Ticket:
        """A slot or a queue place, taken before any response starts (so a refusal is a real
        429/503 status, streaming or not)."""
        return self.admission.enter()

    async def on_engine(
        self, ticket: Ticket, work: Callable[[Engine], Awaitable[T]], timeout_what: str
    ) -> EngineRun:
        """Wait for the slot, then ``work(engine)``; the deadline covers both (504)."""
        began = time.perf_counter()
        async with self.limits.deadline(timeout_what), ticket:
            admitted = time.perf_counter()
            result = await work(self.require_engine())
            done = time.perf_counter()
            self.admission.record_service(done - admitted)
        return EngineRun(result, began, admitted - began, done - admitted)


def usage(prompt: int, completion: int) -> Usage:
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


def template_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    return [m.as_template_message() for m in messages]


def render(engine: Engine, prompt: str | None, messages: list[dict[str, str]] | None) -> list[int]:
    """The chat template applied; a template that rejects the messages is the client's 422."""
    try:
        return engine.render(prompt, messages)
    except InvalidRequest:
        raise
    except Exception as err:  # a chat template that rejects these messages
        raise InvalidRequest("messages", f"the chat template failed: {err}") from err


def tokens_of(engine: Engine, prompt: str | list[int], limits: Limits) -> list[int]:
    """A completions prompt as token ids: a text used as is, or ids within the vocabulary."""
    if isinstance(prompt, str):
        return engine.encode(prompt)
    limits.token_ids(prompt, engine.vocab_size, "prompt")
    return list(prompt)
