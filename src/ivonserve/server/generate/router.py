"""POST /generate: the route translates; the work is ``serving``'s, the events ``stream``'s."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from ivonserve.server.generate.protocol import GenerateRequest, GenerateResponse
from ivonserve.server.generate.serving import generate_response
from ivonserve.server.generate.stream import (
    generate_error_event,
    progress_event,
    respond,
    result_event,
)
from ivonserve.server.routing import ERRORS, SSE, generation, log_fields, with_cancellation

router = APIRouter()


@router.post(
    "/generate",
    response_model=GenerateResponse,
    responses={**ERRORS, 200: {"content": SSE}},
)
@with_cancellation
async def generate(request: GenerateRequest, raw_request: Request) -> Any:
    """Fan the prompt out over posterior draws and samples; return the MBR consensus. With
    ``stream``: server-sent events, one per finished draw, then the result."""
    service = generation(raw_request)
    plan = service.plan_generate(request)
    return await respond(
        service, plan, request.stream, generate_response, log_fields(raw_request),
        opening=(), on_draw=progress_event, closing=result_event, error=generate_error_event,
    )  # fmt: skip
