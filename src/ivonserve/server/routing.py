"""What every router shares: cancellation when the client goes away, the admission slot around a
route's work, the streamed response that gives its slot back, and the error responses the
routes declare in the OpenAPI schema.

Every error is a JSON ``{"error": {...}}`` without a stack trace; a client that disconnects
mid-request cancels its handler, which aborts the request's engine work.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from ivonserve.errors import ShuttingDown, api_error
from ivonserve.server.protocol import ErrorResponse

if TYPE_CHECKING:
    from ivonserve.server.generate.serving import GenerationService
    from ivonserve.server.lifecycle import EngineState
    from ivonserve.server.limits import Ticket
    from ivonserve.server.score.serving import ScoringService
    from ivonserve.server.serving import Service

logger = logging.getLogger("ivonserve.server")

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 422, 429, 503, 504)
}
# with stream: true, 200 is a stream of `data: <JSON>` events ending with `data: [DONE]`
SSE = {"text/event-stream": {"schema": {"description": "server-sent events"}}}


def with_cancellation(handler: Callable) -> Callable:
    """Cancel the handler when the client disconnects (vLLM's pattern): the handler races a task
    that waits for ``http.disconnect``; cancelling it cancels the fan-out, which aborts the
    engine requests. Safe because FastAPI has read the body before the handler runs. A handler
    that returns a stream is done at once; the stream watches for the disconnect itself."""

    @functools.wraps(handler)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        raw_request: Request = kwargs["raw_request"]
        work = asyncio.create_task(handler(*args, **kwargs))
        gone = asyncio.create_task(_wait_disconnect(raw_request))
        try:
            done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            await _cancel(work, gone)
            if not engine_state(raw_request).draining:
                raise
            # uvicorn cancels what still runs at the drain deadline: say so, not a bare 500
            s = raw_request.app.state.settings
            late = ShuttingDown(
                f"the server shut down before the request finished "
                f"(drain_timeout_s={s.drain_timeout_s}); retry",
                retry_after_s=1,
            )
            return api_error(late).response()
        await _cancel(*({work, gone} - done))
        if work in done:
            return work.result()
        raw_request.app.state.metrics.disconnects.inc()
        logger.info("client disconnected; request cancelled")
        return Response(status_code=499)  # nobody reads it: the client is gone

    return wrapper


async def _cancel(*tasks: asyncio.Task) -> None:
    """Cancel and wait for each (the fan-out's engine aborts finish before we answer)."""
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(BaseException):
            await task


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def engine_state(request: Request) -> EngineState:
    return request.app.state.engine_state


def generation(request: Request) -> GenerationService:
    """The app's generation service (``app.create_app`` makes it)."""
    return request.app.state.generation


def scoring(request: Request) -> ScoringService:
    """The app's scoring service (``app.create_app`` makes it)."""
    return request.app.state.scoring


def log_fields(request: Request) -> dict[str, Any]:
    """The dict of the request's access-log line (``middleware.RequestContext``)."""
    return request.scope.get("state", {}).get("log", {})


async def in_slot(service: Service, work: Callable[[Ticket], Awaitable[Any]]) -> Any:
    """Take a slot (or a queue place), run ``work(ticket)`` to completion, give the slot back."""
    ticket = service.admit()
    try:
        return await work(ticket)
    finally:
        ticket.release()


class TicketedStream(StreamingResponse):
    """A stream that gives its admission ticket back even if it never starts (client gone
    before the first byte): the generator's own ``finally`` would not run then."""

    def __init__(self, ticket: Ticket, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ticket = ticket

    async def __call__(self, *args: Any) -> None:
        try:
            await super().__call__(*args)
        finally:
            self.ticket.release()
