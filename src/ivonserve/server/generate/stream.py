"""A generation's answer, whole or as server-sent events (for /generate and the OpenAI routes),
and /generate's own events: each finished draw's candidates, then the result (or the error).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from pydantic import BaseModel

from ivonserve.answers import extract_answer
from ivonserve.engine import STOPPED, Generated
from ivonserve.errors import api_error
from ivonserve.server.generate.serving import (
    GenerationService,
    Outcome,
    Plan,
    candidate_out,
    generate_response,
)
from ivonserve.server.limits import Ticket
from ivonserve.server.routing import TicketedStream, in_slot

KEEPALIVE_S = 10.0  # an SSE comment this often while candidates are generated (proxies, clients)
_KEEPALIVE = b": keep-alive\n\n"
_DONE = b"data: [DONE]\n\n"


async def respond(
    service: GenerationService,
    plan: Plan,
    stream: bool,
    shape: Callable[[Outcome], Any],
    log: dict[str, Any],
    **events: Any,
) -> Any:
    """The body every generation route shares: the shaped answer, or its event stream (the slot
    is taken before the stream starts, so a refusal is still a real 429)."""
    if not stream:
        return shape(await in_slot(service, lambda t: service.run(plan, t, log)))
    ticket = service.admit()
    body = sse_events(service, plan, ticket, log, **events)
    return TicketedStream(
        ticket, body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


async def sse_events(
    service: GenerationService,
    plan: Plan,
    ticket: Ticket,
    log: dict[str, Any],
    opening: Iterable[BaseModel | dict],
    on_draw: Callable[[list[Generated]], BaseModel | dict] | None,
    closing: Callable[[Outcome], Iterable[BaseModel | dict]],
    error: Callable[[dict[str, Any]], dict],
    keepalive: Callable[[], BaseModel | dict] | None = None,
) -> AsyncIterator[bytes]:
    """Server-sent events: ``opening`` at once, an event per finished draw (``on_draw``),
    every KEEPALIVE_S while waiting a ``keepalive()`` event (default: an SSE comment; the
    OpenAI routes send a chunk with no text, since vLLM's benchmark client strips each
    network read, so a comment glued onto the chunk after it and that chunk was lost), then
    ``closing(outcome)`` and ``[DONE]``. Any error after the stream began (a limit, a timeout,
    the engine dying) is ``error(body)`` as the last event before ``[DONE]``: a stream always
    ends, never breaks off."""
    draws: asyncio.Queue[list[Generated]] = asyncio.Queue()
    work = asyncio.create_task(
        service.run(plan, ticket, log, draws.put_nowait if on_draw else None)
    )
    try:
        for event in opening:
            yield sse(event)
        while not work.done():
            waiting = asyncio.ensure_future(draws.get())
            await asyncio.wait(
                {work, waiting}, timeout=KEEPALIVE_S, return_when=asyncio.FIRST_COMPLETED
            )
            if waiting.done():
                yield sse(on_draw(waiting.result()))
            else:
                waiting.cancel()
                if not work.done():
                    yield sse(keepalive()) if keepalive else _KEEPALIVE
        while not draws.empty():
            yield sse(on_draw(draws.get_nowait()))
        failure = asyncio.CancelledError() if work.cancelled() else work.exception()
        if failure is not None:
            yield sse(error(api_error(failure).body()))
        else:
            for event in closing(work.result()):
                yield sse(event)
        yield _DONE
    except asyncio.CancelledError:
        if not service.admission.draining:  # else: the drain deadline passed
            service.metrics.disconnects.inc()  # the client left: the fan-out is aborted below
        raise
    finally:
        if not work.done():
            work.cancel()
            with contextlib.suppress(BaseException):
                await work
        ticket.release()


def sse(event: BaseModel | dict) -> bytes:
    data = event.model_dump_json() if isinstance(event, BaseModel) else json.dumps(event)
    return f"data: {data}\n\n".encode()


# --- /generate's events -----------------------------------------------------------------------
def progress_event(candidates: list[Generated]) -> dict[str, Any]:
    """One /generate progress event: a draw's candidates, as soon as that draw finished (with
    early stopping, or was stopped: its stopped candidates have finish_reason early_stop)."""
    return {
        "type": "candidates",
        "candidates": [
            candidate_out(
                c, None if c.finish_reason == STOPPED else extract_answer(c.text), None
            ).model_dump()
            for c in candidates
        ],
    }


def result_event(outcome: Outcome) -> list[dict[str, Any]]:
    return [{"type": "result", "result": generate_response(outcome).model_dump()}]


def generate_error_event(body: dict[str, Any]) -> dict[str, Any]:
    """/generate's typed events end with ``{"type": "error", "error": {...}}`` on failure."""
    return {"type": "error", **body}
