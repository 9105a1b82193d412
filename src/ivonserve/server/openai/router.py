"""OpenAI's routes: GET /v1/models, POST /v1/chat/completions and POST /v1/completions (which
scores with ``echo``). They translate; the work is ``serving``'s and ``echo``'s."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from ivonserve.errors import InvalidRequest
from ivonserve.server.generate.stream import respond
from ivonserve.server.openai import echo
from ivonserve.server.openai.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelList,
)
from ivonserve.server.openai.serving import (
    ChatStream,
    CompletionStream,
    chat_response,
    completion_response,
    model_list,
    plan_chat,
    plan_completion,
)
from ivonserve.server.routing import (
    ERRORS,
    SSE,
    engine_state,
    generation,
    in_slot,
    log_fields,
    scoring,
    with_cancellation,
)

# /v1/models is listed before the other features' routes, the completions after them
models_router = APIRouter()
router = APIRouter()


@models_router.get("/v1/models", response_model=ModelList)
async def models(raw_request: Request) -> ModelList:
    """Every served posterior with its pool (known from the settings while the engine starts)."""
    return model_list(engine_state(raw_request), raw_request.app.state.created)


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses={**ERRORS, 200: {"content": SSE}},
)
@with_cancellation
async def chat_completions(request: ChatCompletionRequest, raw_request: Request) -> Any:
    """OpenAI-compatible chat: ``choices[0]`` is the consensus, ``ivonserve`` says how it was
    chosen. Extra body fields: n_models, n_samples, selection, utility, return_candidates."""
    service = generation(raw_request)
    plan = plan_chat(service, request)
    chunks = ChatStream(plan, request.include_usage)
    return await respond(
        service, plan, request.stream, chat_response, log_fields(raw_request),
        opening=chunks.opening(), on_draw=None, closing=chunks.closing, error=chunks.error,
        keepalive=chunks.keepalive,
    )  # fmt: skip


@router.post(
    "/v1/completions",
    response_model=CompletionResponse,
    responses={**ERRORS, 200: {"content": SSE}},
)
@with_cancellation
async def completions(request: CompletionRequest, raw_request: Request) -> Any:
    """OpenAI-compatible completions: the prompt is used as is (no chat template). With
    ``echo`` and ``max_tokens`` 0 or 1 it scores the prompt (OpenAI's legacy scoring)."""
    log = log_fields(raw_request)
    if request.scoring:
        if request.stream:
            raise InvalidRequest("stream", "scoring (echo) is not streamed")
        scorer = scoring(raw_request)
        scored = echo.plan_echo(scorer, request)
        return await in_slot(scorer, lambda t: echo.echo(scorer, scored, t, log))
    service = generation(raw_request)
    plan = plan_completion(service, request)
    chunks = CompletionStream(plan, request.include_usage)
    return await respond(
        service, plan, request.stream, completion_response, log,
        opening=chunks.opening(), on_draw=None, closing=chunks.closing, error=chunks.error,
        keepalive=chunks.keepalive,
    )  # fmt: skip
