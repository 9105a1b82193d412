"""The FastAPI app: factory, thin routes, error handlers, and ``serve`` (uvicorn).

The app comes up at once and answers ``/health`` (200) and ``/ready`` (503) while the engine
starts in a background task of the lifespan; ``/ready`` turns 200 once vLLM is up and every pool
registered. A watchdog turns ``/ready`` back to 503 and stops the server (exit code 1, for the
restart policy) if the engine dies later. Every error is a JSON ``{"error": {...}}`` without a
stack trace; a client that disconnects mid-request cancels its handler, which aborts the
request's engine work. On SIGTERM the server drains: no new connections, in-flight requests run
up to ``drain_timeout_s``, the rest are aborted, exit code 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import socket
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ivonserve.config import Settings
from ivonserve.engine import Engine, EngineError, EngineNotReady, InvalidRequest
from ivonserve.errors import IvonserveError
from ivonserve.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorInfo,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    Health,
    ModelCard,
    ModelList,
    Readiness,
)
from ivonserve.server.limits import Admission, Ticket
from ivonserve.server.metrics import Metrics
from ivonserve.server.middleware import RequestContext
from ivonserve.server.serving import (
    ApiError,
    ChatStream,
    CompletionStream,
    GenerationService,
    Plan,
    chat_response,
    completion_response,
    error_type,
    generate_response,
    progress_event,
    result_event,
)

logger = logging.getLogger("ivonserve.server")
WATCHDOG_S = 1.0
EXIT_ENGINE_DIED = 1


class EngineState:
    """The app's engine and its life: starting -> ready -> (draining | died), or failed."""

    def __init__(self, settings: Settings, engine: Engine | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self.owned = engine is None  # an engine passed in belongs to the caller
        self.error: str | None = None
        self.died = False
        self.draining = False
        self.task: asyncio.Task | None = None
        self.began = time.perf_counter()
        self.startup_s: float | None = 0.0 if engine is not None else None
        self.stopped = False
        self.on_fatal: Callable[[], None] | None = None  # serve(): stop uvicorn

    async def start(self) -> None:
        try:
            self.engine = await Engine.start(self.settings)
            self.startup_s = time.perf_counter() - self.began
            logger.info("ready after %.1f s", self.startup_s)
        except asyncio.CancelledError:
            raise
        except Exception as err:
            self.error = (
                str(err) if isinstance(err, IvonserveError) else f"{type(err).__name__}: {err}"
            )
            # a user error (bad folder, bad model) is one line; anything else gets its traceback
            trace = None if isinstance(err, IvonserveError) else err
            logger.error("engine failed to start: %s", self.error, exc_info=trace)
            self._fatal()
            return
        await self._watch()

    async def _watch(self) -> None:
        """Poll the started engine; if it dies, fail readiness and stop the server."""
        while not self.stopped:
            engine = self.engine
            if engine is not None and engine.dead:
                self.died = True
                self.error = (
                    "the vLLM engine died; the server stops (its restart policy revives it)"
                )
                logger.error(self.error)
                self._fatal()
                return
            await asyncio.sleep(WATCHDOG_S)

    def _fatal(self) -> None:
        if self.on_fatal is not None:
            self.on_fatal()

    async def stop(self) -> None:
        self.stopped = True
        if self.task is not None and not self.task.done():
            if self.engine is not None:  # started: only the watchdog runs; stop it
                self.task.cancel()
            # vLLM starts in a worker thread that cannot be interrupted: let it finish, then stop
            with contextlib.suppress(BaseException):
                await self.task
        if self.owned and self.engine is not None:
            await self.engine.shutdown()

    def readiness(self) -> Readiness:
        if self.error is not None:
            return Readiness(status="failed", detail=self.error)
        if self.draining:
            return Readiness(status="draining", detail="shutting down: finishing in-flight work")
        if self.engine is not None and self.engine.ready:
            return Readiness(status="ready", startup_s=self.startup_s)
        if self.stopped or self.engine is not None:
            return Readiness(status="stopped", detail="the engine is not running")
        return Readiness(
            status="starting",
            detail=f"starting for {time.perf_counter() - self.began:.0f} s",
        )

    def require(self) -> Engine:
        if self.engine is None or not self.engine.ready:
            state = self.readiness()
            raise ApiError(503, f"the engine is not ready ({state.status}: {state.detail})")
        return self.engine

    def snapshot(self, admission: Admission) -> dict[str, Any]:
        """The live values /metrics exports at each scrape."""
        engine = self.engine
        return {
            "in_flight": admission.in_flight,
            "queued": admission.queued,
            "ready": int(engine is not None and engine.ready),
            "aborted": engine.aborted_requests if engine is not None else 0,
            "pools": {name: p.size for name, p in engine.pools.items()} if engine else {},
        }


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
            return error_response(
                503,
                f"the server shut down before the request finished "
                f"(drain_timeout_s={s.drain_timeout_s}); retry",
                headers={"Retry-After": "1"},
            )
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


def _log(request: Request) -> dict[str, Any]:
    return request.scope.get("state", {}).get("log", {})


async def _answer(request: Request, plan: Plan, shape: Callable) -> Any:
    """Run a planned request to completion in its slot and shape the answer."""
    service = _service(request)
    ticket = service.admit()
    try:
        return shape(await service.run(plan, ticket, _log(request)))
    finally:
        ticket.release()


def _stream(request: Request, plan: Plan, ticket: Ticket, **events: Any) -> StreamingResponse:
    body = _service(request).stream(plan, ticket, _log(request), **events)
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
    service = _service(raw_request)
    plan = service.plan_generate(request)
    if not request.stream:
        return await _answer(raw_request, plan, generate_response)
    ticket = service.admit()
    return _stream(
        raw_request, plan, ticket, opening=(), on_draw=progress_event, closing=result_event
    )


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses={**_ERRORS, 200: {"content": _SSE}},
)
@with_cancellation
async def chat_completions(request: ChatCompletionRequest, raw_request: Request) -> Any:
    """OpenAI-compatible chat: ``choices[0]`` is the consensus, ``ivonserve`` says how it was
    chosen. Extra body fields: n_models, n_samples, selection, utility, return_candidates."""
    service = _service(raw_request)
    plan = service.plan_chat(request)
    if not request.stream:
        return await _answer(raw_request, plan, chat_response)
    ticket = service.admit()
    chunks = ChatStream(plan, request.include_usage)
    return _stream(
        raw_request, plan, ticket, opening=chunks.opening(), on_draw=None, closing=chunks.closing
    )


@router.post(
    "/v1/completions",
    response_model=CompletionResponse,
    responses={**_ERRORS, 200: {"content": _SSE}},
)
@with_cancellation
async def completions(request: CompletionRequest, raw_request: Request) -> Any:
    """OpenAI-compatible completions: the prompt is used as is (no chat template)."""
    service = _service(raw_request)
    plan = service.plan_completion(request)
    if not request.stream:
        return await _answer(raw_request, plan, completion_response)
    ticket = service.admit()
    chunks = CompletionStream(plan, request.include_usage)
    return _stream(raw_request, plan, ticket, opening=(), on_draw=None, closing=chunks.closing)


# --- errors -----------------------------------------------------------------------------------
def error_response(
    status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    info = ErrorInfo(message=message, type=error_type(status), param=param, code=status)
    return JSONResponse(ErrorResponse(error=info).model_dump(), status_code=status, headers=headers)


def _field(loc: tuple | list) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts) or "body"


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    messages, first = [], None
    for err in exc.errors():
        name = _field(err.get("loc", ()))
        first = first or name
        msg = str(err.get("msg", "invalid"))
        if err.get("type") == "extra_forbidden":
            msg = "unknown field (not allowed)"
        elif err.get("type") == "missing":
            msg = "field required"
        messages.append(f"{name}: {msg}")
    return error_response(422, "; ".join(messages) or "invalid request", first)


async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.param, exc.headers)


async def _ivonserve_error(_: Request, exc: IvonserveError) -> JSONResponse:
    if isinstance(exc, InvalidRequest):
        return error_response(422, f"{exc.field}: {exc}", exc.field)
    if isinstance(exc, EngineNotReady | EngineError):
        return error_response(503, str(exc))
    return error_response(422, str(exc))


async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error_response(exc.status_code, str(exc.detail), headers=exc.headers)


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    logger.error("unexpected error", exc_info=exc)
    return error_response(500, f"internal error ({type(exc).__name__}); see the server log")


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
    app.include_router(router)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(IvonserveError, _ivonserve_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
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


def start_draining(app: FastAPI) -> None:
    """Refuse new generation work (503 with Retry-After) and fail /ready; in-flight work runs."""
    app.state.engine_state.draining = True
    app.state.admission.draining = True


def _check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise IvonserveError(f"cannot listen on {host}:{port}: {err.strerror}") from None


def check_before_start(settings: Settings) -> None:
    """Everything a user can get wrong, checked before the server listens: the base model (its
    config, tokenizer and weight files), and every posterior (files, shapes, finiteness, fit to
    the model). A defect is a one-line IvonserveError naming the file, never a half-started
    server."""
    from ivonserve.model import check_model, resolve_model
    from ivonserve.posterior import load_served

    model_dir = resolve_model(settings.model, settings.cache_dir)
    check_model(model_dir)
    for spec in settings.posterior_specs():
        load_served(spec.path, spec.kind, model_dir)
    settings.api_key_list()  # an unreadable or empty key file


def serve(settings: Settings) -> int:
    """Print the settings, run uvicorn until stopped. Exit codes: 0 after SIGTERM/SIGINT (drained),
    1 if the engine died while serving; a failed start raises (exit 2 from the CLI)."""
    import uvicorn

    logging.basicConfig(
        level=getattr(logging, settings.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("ivonserve").setLevel(getattr(logging, settings.log_level.upper()))
    print("ivonserve settings:\n" + settings.summary(), flush=True)
    _check_port(settings.host, settings.port)
    check_before_start(settings)
    app = create_app(settings)

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if not self.should_exit:
                logger.info("signal %d: draining (up to %.0f s)", sig, settings.drain_timeout_s)
            start_draining(app)
            super().handle_exit(sig, frame)

    server = DrainingServer(
        uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            access_log=False,  # ivonserve.access logs one structured line per request
            timeout_graceful_shutdown=settings.drain_timeout_s,
        )
    )

    def fatal() -> None:
        server.should_exit = True

    app.state.engine_state.on_fatal = fatal
    # uvicorn re-raises the signal it caught once it has shut down; with the default SIGTERM
    # handler that would kill the drained process with status 143 instead of exiting 0
    signal.signal(signal.SIGTERM, lambda *_: None)
    print(f"ivonserve: http://{settings.host}:{settings.port} (ready at /ready)", flush=True)
    server.run()
    state = app.state.engine_state
    if state.died:
        print(f"ivonserve: error: {state.error}", flush=True)
        return EXIT_ENGINE_DIED
    if state.error is not None:
        raise IvonserveError(f"the engine failed to start: {state.error}")
    return 0
