"""The FastAPI app: the factory and thin routes; the work is in ``serving`` and ``scoring``,
the answers' shapes in ``responses``, errors in ``errors``, the engine's life in ``lifecycle``.

Every error is a JSON ``{"error": {...}}`` without a stack trace; a client that disconnects
mid-request cancels its handler, which aborts the request's engine work.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ivonserve.config import Settings
from ivonserve.engine import Engine
from ivonserve.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChoiceScoreRequest,
    ChoiceScoreResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    Health,
    ModelCard,
    ModelList,
    Readiness,
    ScoreRequest,
    ScoreResponse,
)
from ivonserve.server.errors import ApiError, add_error_handlers
from ivonserve.server.lifecycle import EngineState
from ivonserve.server.limits import Admission, Ticket
from ivonserve.server.metrics import Metrics
from ivonserve.server.middleware import RequestContext
from ivonserve.server.page import add_page
from ivonserve.server.responses import (
    ChatStream,
    CompletionStream,
    chat_response,
    completion_response,
    generate_error_event,
    generate_response,
    progress_event,
    result_event,
)
from ivonserve.server.scoring import ScoringService
from ivonserve.server.serving import GenerationService, Outcome, Plan

logger = logging.getLogger("ivonserve.server")


# --- routes -----------------------------------------------------------------------------------
router = APIRouter()
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 422, 429, 503, 504)
}
# with stream: true, 200 is a stream of `data: <JSON>` events ending with `data: [DONE]`
_SSE = {"text/event-stream": {"schema": {"description": "server-sent events"}}}


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
            if not _state(raw_request).draining:
                raise
            # uvicorn cancels what still runs at the drain deadline: say so, not a bare 500
            s = raw_request.app.state.settings
            return ApiError(
                503,
                f"the server shut down before the request finished "
                f"(drain_timeout_s={s.drain_timeout_s}); retry",
                headers={"Retry-After": "1"},
            ).response()
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


def _state(request: Request) -> EngineState:
    return request.app.state.engine_state


def _service(request: Request) -> GenerationService:
    return request.app.state.generation


def _scoring(request: Request) -> ScoringService:
    return request.app.state.scoring


def _log(request: Request) -> dict[str, Any]:
    return request.scope.get("state", {}).get("log", {})


async def _in_slot(request: Request, work: Callable[[Ticket], Awaitable[Any]]) -> Any:
    """Take a slot (or a queue place), run ``work(ticket)`` to completion, give the slot back."""
    ticket = _service(request).admit()
    try:
        return await work(ticket)
    finally:
        ticket.release()


async def _generation(
    request: Request,
    plan: Plan,
    stream: bool,
    shape: Callable[[Outcome], Any],
    **events: Any,
) -> Any:
    """The body every generation route shares: the shaped answer, or its event stream (the slot
    is taken before the stream starts, so a refusal is still a real 429)."""
    service = _service(request)
    if not stream:
        return shape(await _in_slot(request, lambda t: service.run(plan, t, _log(request))))
    ticket = service.admit()
    body = service.stream(plan, ticket, _log(request), **events)
    return TicketedStream(
        ticket, body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


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


@router.get("/health", response_model=Health)
async def health() -> Health:
    """The process is up (200 always); see /ready for the engine."""
    return Health()


@router.get("/ready", response_model=Readiness, responses={503: {"model": Readiness}})
async def ready(raw_request: Request) -> Any:
    """200 once the engine is started and every pool registered; 503 before, while draining,
    or after a failure."""
    state = _state(raw_request).readiness()
    code = 200 if state.status == "ready" else 503
    return JSONResponse(state.model_dump(), status_code=code)


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def metrics(raw_request: Request) -> Response:
    """Prometheus metrics (text exposition format)."""
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(raw_request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models", response_model=ModelList)
async def models(raw_request: Request) -> ModelList:
    """Every served posterior with its pool (known from the settings while the engine starts)."""
    state = _state(raw_request)
    s = state.settings
    engine = state.engine
    ready = engine is not None and engine.ready
    base = str(engine.model_dir) if engine is not None and engine.model_dir else s.model
    cards = []
    for i, spec in enumerate(s.posterior_specs()):
        pool = engine.pools.get(spec.name) if engine is not None else None
        ess = pool.info.get("ess") if pool is not None else None
        cards.append(
            ModelCard(
                id=spec.name,
                created=raw_request.app.state.created,
                root=str(spec.path),
                kind=spec.kind,
                base_model=base or "embedded:smollm2-135m-instruct",
                ess=ess if spec.kind == "posterior" else None,
                pool_size=pool.size if pool is not None else s.pool_size,
                pool_seed=s.pool_seed,
                sampling_temperature=s.sampling_temperature,
                prune=s.prune,
                prune_by=s.prune_by,
                default=i == 0,
                ready=ready,
            )
        )
    return ModelList(data=cards)


@router.post(
    "/generate",
    response_model=GenerateResponse,
    responses={**_ERRORS, 200: {"content": _SSE}},
)
@with_cancellation
async def generate(request: GenerateRequest, raw_request: Request) -> Any:
    """Fan the prompt out over posterior draws and samples; return the MBR consensus. With
    ``stream``: server-sent events, one per finished draw, then the result."""
    plan = _service(raw_request).plan_generate(request)
    return await _generation(
        raw_request, plan, request.stream, generate_response,
        opening=(), on_draw=progress_event, closing=result_event, error=generate_error_event,
    )  # fmt: skip


@router.post("/score", response_model=ScoreResponse, responses=_ERRORS)
@with_cancellation
async def score(request: ScoreRequest, raw_request: Request) -> Any:
    """The log-likelihood of each continuation given the prompt under the posterior predictive
    of n_models draws (0: the mean adapter), with the draws' own and their disagreement."""
    service = _scoring(raw_request)
    plan = service.plan_score(request)
    return await _in_slot(raw_request, lambda t: service.score(plan, t, _log(raw_request)))


@router.post("/score/choices", response_model=ChoiceScoreResponse, responses=_ERRORS)
@with_cancellation
async def score_choices(request: ChoiceScoreRequest, raw_request: Request) -> Any:
    """The probability of each choice of a multiple-choice question under the posterior
    predictive of n_models draws (0: the mean adapter), from one forward pass per draw."""
    service = _scoring(raw_request)
    plan = service.plan_choices(request)
    return await _in_slot(raw_request, lambda t: service.choices(plan, t, _log(raw_request)))


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses={**_ERRORS, 200: {"content": _SSE}},
)
@with_cancellation
async def chat_completions(request: ChatCompletionRequest, raw_request: Request) -> Any:
    """OpenAI-compatible chat: ``choices[0]`` is the consensus, ``ivonserve`` says how it was
    chosen. Extra body fields: n_models, n_samples, selection, utility, return_candidates."""
    plan = _service(raw_request).plan_chat(request)
    chunks = ChatStream(plan, request.include_usage)
    return await _generation(
        raw_request, plan, request.stream, chat_response,
        opening=chunks.opening(), on_draw=None, closing=chunks.closing, error=chunks.error,
        keepalive=chunks.keepalive,
    )  # fmt: skip


@router.post(
    "/v1/completions",
    response_model=CompletionResponse,
    responses={**_ERRORS, 200: {"content": _SSE}},
)
@with_cancellation
async def completions(request: CompletionRequest, raw_request: Request) -> Any:
    """OpenAI-compatible completions: the prompt is used as is (no chat template). With
    ``echo`` and ``max_tokens`` 0 or 1 it scores the prompt (OpenAI's legacy scoring)."""
    if request.scoring:
        if request.stream:
            raise ApiError(422, "stream: scoring (echo) is not streamed", "stream")
        service = _scoring(raw_request)
        plan = service.plan_echo(request)
        return await _in_slot(raw_request, lambda t: service.echo(plan, t, _log(raw_request)))
    plan = _service(raw_request).plan_completion(request)
    chunks = CompletionStream(plan, request.include_usage)
    return await _generation(
        raw_request, plan, request.stream, completion_response,
        opening=chunks.opening(), on_draw=None, closing=chunks.closing, error=chunks.error,
        keepalive=chunks.keepalive,
    )  # fmt: skip


# --- app --------------------------------------------------------------------------------------
def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    """The ASGI app. Without ``engine``, the lifespan starts one in the background (and stops it
    at shutdown); a started ``engine`` passed in is used as is and left running."""
    state = EngineState(settings, engine)
    admission = Admission(settings.max_in_flight, settings.max_queued)
    metrics = Metrics()
    metrics.watch(lambda: state.snapshot(admission))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if state.engine is None:
            state.began = time.perf_counter()
            state.task = asyncio.create_task(state.start(), name="ivonserve-engine")
        else:
            state.task = asyncio.create_task(state._watch(), name="ivonserve-watchdog")
        try:
            yield
        finally:
            await state.stop()

    from ivonserve import __version__

    app = FastAPI(
        title="ivonserve",
        version=__version__,
        description="Test-time scaling with IVON posterior draws as vLLM LoRA slots and MBR.",
        lifespan=lifespan,
    )
    app.state.engine_state = state
    app.state.admission = admission
    app.state.metrics = metrics
    app.state.settings = settings
    app.state.created = int(time.time())
    app.state.generation = GenerationService(settings, state.require, admission, metrics)
    app.state.scoring = ScoringService(settings, state.require, admission, metrics)
    app.include_router(router)
    add_page(app)  # the consensus page at /ui/ (issue 32)
    add_error_handlers(app)
    app.add_middleware(
        RequestContext,
        metrics=metrics,
        api_keys=settings.api_key_list(),
        max_body_bytes=settings.max_body_bytes,
    )
    if settings.cors_origins:  # outermost: a preflight never needs a key
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "X-Request-Id"],
            expose_headers=["X-Request-Id", "Retry-After"],
        )
    return app
