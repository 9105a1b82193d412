"""The HTTP server: FastAPI app factory, thin routes, the work in ``GenerateService``; uvicorn.

The app comes up at once and answers ``/health`` (200) and ``/ready`` (503) while the engine
starts in a background task of the lifespan; ``/ready`` turns 200 once vLLM is up and the pool is
registered. Every error is a JSON ``{"error": {...}}`` without a stack trace; a client that
disconnects mid-request cancels its handler, which aborts the request's engine work.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import sys
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from http import HTTPStatus
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ivonserve import mbr
from ivonserve.answers import extract_answer
from ivonserve.config import Settings
from ivonserve.engine import (
    Engine,
    EngineError,
    EngineNotReady,
    FanOut,
    InvalidRequest,
    SamplingOptions,
)
from ivonserve.errors import IvonserveError
from ivonserve.protocol import (
    CandidateOut,
    ErrorInfo,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    Health,
    ModelCard,
    ModelList,
    Readiness,
    Timing,
    Usage,
)

logger = logging.getLogger("ivonserve.server")


class ApiError(Exception):
    """An error answered as ``ErrorResponse`` with its HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param)


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = {
        400: "BadRequestError",
        404: "NotFoundError",
        422: "BadRequestError",
        503: "ServiceUnavailableError",
        504: "TimeoutError",
    }.get(status, "InternalServerError" if status >= 500 else "Error")
    body = ErrorResponse(error=ErrorInfo(message=message, type=kind, param=param, code=status))
    return JSONResponse(body.model_dump(), status_code=status)


class EngineState:
    """The app's engine and its start-up: starting -> ready, or failed (with the reason)."""

    def __init__(self, settings: Settings, engine: Engine | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self.owned = engine is None  # an engine passed in belongs to the caller
        self.error: str | None = None
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
            if self.on_fatal is not None:
                self.on_fatal()

    async def stop(self) -> None:
        self.stopped = True
        if self.task is not None and not self.task.done():
            # vLLM starts in a worker thread that cannot be interrupted: let it finish, then stop
            with contextlib.suppress(BaseException):
                await self.task
        if self.owned and self.engine is not None:
            await self.engine.shutdown()

    def readiness(self) -> Readiness:
        if self.engine is not None and self.engine.ready:
            return Readiness(status="ready", startup_s=self.startup_s)
        if self.error is not None:
            return Readiness(status="failed", detail=self.error)
        if self.stopped or (self.engine is not None and not self.engine.ready):
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


class GenerateService:
    """The work behind POST /generate: defaults and limits, fan-out, MBR selection."""

    def __init__(self, settings: Settings, state: EngineState) -> None:
        self.settings = settings
        self.state = state

    async def generate(self, req: GenerateRequest) -> GenerateResponse:
        began = time.perf_counter()
        engine = self.state.require()
        s = self.settings
        if req.model is not None and req.model not in engine.pools:
            raise ApiError(
                404,
                f"the model {req.model!r} does not exist; served: {', '.join(engine.pools)}",
                "model",
            )
        pool = engine.pool(req.model)
        n_models = req.n_models if req.n_models is not None else min(s.default_n_models, pool.size)
        if n_models > pool.size:
            raise ApiError(
                422, f"n_models: must be <= the pool size {pool.size}, got {n_models}", "n_models"
            )
        n_samples = req.n_samples if req.n_samples is not None else s.default_n_samples
        count = max(1, n_models) * n_samples
        if count > s.max_candidates:
            raise ApiError(
                422,
                f"n_samples: max(1, n_models) * n_samples = {count} candidates exceeds "
                f"max_candidates {s.max_candidates}",
                "n_samples",
            )
        max_tokens = req.max_tokens if req.max_tokens is not None else s.default_max_tokens
        if max_tokens > s.max_tokens_limit:
            raise ApiError(
                422,
                f"max_tokens: must be <= {s.max_tokens_limit}, got {max_tokens}",
                "max_tokens",
            )
        selection = req.selection or s.default_selection
        utility = req.utility or s.default_utility
        try:
            prompt_ids = engine.render(
                req.prompt, [m.model_dump() for m in req.messages] if req.messages else None
            )
        except InvalidRequest:
            raise
        except Exception as err:  # a chat template that rejects these messages
            raise ApiError(422, f"messages: the chat template failed: {err}", "messages") from err
        sampling = SamplingOptions(
            max_tokens=max_tokens,
            temperature=req.temperature if req.temperature is not None else s.default_temperature,
            top_p=req.top_p if req.top_p is not None else s.default_top_p,
            seed=req.seed,
            ignore_eos=req.ignore_eos,
            stop=tuple(req.stop or ()),
        )
        try:
            async with asyncio.timeout(s.request_timeout_s):
                fan = await engine.fan_out(prompt_ids, n_models, n_samples, sampling, pool.name)
        except TimeoutError:
            raise ApiError(
                504, f"the request took longer than request_timeout_s={s.request_timeout_s}"
            ) from None
        generated = time.perf_counter()
        chosen = await asyncio.to_thread(_select, fan, selection, utility)
        selected = time.perf_counter()
        return _response(
            req,
            pool.name,
            fan,
            chosen,
            sampling,
            n_models,
            n_samples,
            selection,
            utility,
            Timing(
                generate_s=round(generated - began, 4),
                select_s=round(selected - generated, 4),
                total_s=round(selected - began, 4),
            ),
        )


def _select(fan: FanOut, selection: str, utility: str) -> Any:
    candidates = [
        mbr.Candidate(model=c.model or 0, text=c.text, logprob=c.logprob, tokens=c.tokens)
        for c in fan.candidates
    ]
    try:
        return mbr.select(candidates, method=selection, utility=utility)
    except ValueError as err:
        raise ApiError(422, f"selection: {err}", "selection") from err


def _response(
    req: GenerateRequest,
    name: str,
    fan: FanOut,
    chosen: Any,
    sampling: SamplingOptions,
    n_models: int,
    n_samples: int,
    selection: str,
    utility: str,
    timing: Timing,
) -> GenerateResponse:
    winner = fan.candidates[chosen.index]
    candidates = None
    if req.return_candidates:
        answers = getattr(chosen, "answers", None) or [
            extract_answer(c.text) for c in fan.candidates
        ]
        candidates = [
            CandidateOut(
                model=c.model,
                sample=c.sample,
                text=c.text,
                answer=answers[i],
                logprob=c.logprob,
                tokens=c.tokens,
                finish_reason=c.finish_reason,
                score=float(chosen.scores[i]),
            )
            for i, c in enumerate(fan.candidates)
        ]
    return GenerateResponse(
        id=f"gen-{uuid.uuid4().hex}",
        model=name,
        text=chosen.text,
        answer=chosen.answer,
        confidence=float(chosen.confidence),
        chosen_model=winner.model,
        chosen_sample=winner.sample,
        n_models=n_models,
        n_samples=n_samples,
        max_tokens=sampling.max_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        seed=fan.seed,
        selection=selection,
        utility=utility,
        candidates=candidates,
        usage=Usage(
            prompt_tokens=fan.prompt_tokens,
            completion_tokens=fan.completion_tokens,
            total_tokens=fan.prompt_tokens + fan.completion_tokens,
        ),
        timing=timing,
    )


# --- routes -----------------------------------------------------------------------------------
router = APIRouter()
_ERRORS = {
    code: {"model": ErrorResponse} for code in (404, 422, HTTPStatus.SERVICE_UNAVAILABLE, 504)
}


def with_cancellation(handler: Callable) -> Callable:
    """Cancel the handler when the client disconnects (vLLM's pattern): the handler races a task
    that waits for ``http.disconnect``; cancelling it cancels the fan-out, which aborts the
    engine requests. Safe because FastAPI has read the body before the handler runs."""

    @functools.wraps(handler)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        raw_request: Request = kwargs["raw_request"]
        work = asyncio.create_task(handler(*args, **kwargs))
        gone = asyncio.create_task(_wait_disconnect(raw_request))
        done, pending = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        if work in done:
            return work.result()
        with contextlib.suppress(BaseException):
            await work  # let the cancellation (and the engine aborts) finish
        logger.info("client disconnected; request cancelled")
        return Response(status_code=499)  # nobody reads it: the client is gone

    return wrapper


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _state(request: Request) -> EngineState:
    return request.app.state.engine_state


@router.get("/health", response_model=Health)
async def health() -> Health:
    """The process is up (200 always); see /ready for the engine."""
    return Health()


@router.get("/ready", response_model=Readiness, responses={503: {"model": Readiness}})
async def ready(raw_request: Request) -> Any:
    """200 once the engine is started and the pool registered; 503 before (or after a failure)."""
    state = _state(raw_request).readiness()
    code = 200 if state.status == "ready" else 503
    return JSONResponse(state.model_dump(), status_code=code)


@router.get("/v1/models", response_model=ModelList)
async def models(raw_request: Request) -> ModelList:
    state = _state(raw_request)
    s = state.settings
    engine = state.engine
    base = str(engine.model_dir) if engine is not None and engine.model_dir else (s.model or "")
    return ModelList(
        data=[
            ModelCard(
                id=s.served_name,
                created=raw_request.app.state.created,
                root=str(s.posterior),
                base_model=base or "embedded:smollm2-135m-instruct",
                pool_size=s.pool_size,
                pool_seed=s.pool_seed,
                sampling_temperature=s.sampling_temperature,
                prune=s.prune,
                prune_by=s.prune_by,
                ready=engine is not None and engine.ready,
            )
        ]
    )


@router.post("/generate", response_model=GenerateResponse, responses=_ERRORS)
@with_cancellation
async def generate(request: GenerateRequest, raw_request: Request) -> GenerateResponse:
    """Fan the prompt out over posterior draws and samples; return the MBR consensus."""
    return await raw_request.app.state.generate_service.generate(request)


# --- errors -----------------------------------------------------------------------------------
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
    return exc.response()


async def _ivonserve_error(_: Request, exc: IvonserveError) -> JSONResponse:
    if isinstance(exc, InvalidRequest):
        return error_response(422, f"{exc.field}: {exc}", exc.field)
    if isinstance(exc, EngineNotReady):
        return error_response(503, str(exc))
    if isinstance(exc, EngineError):
        return error_response(503, str(exc))
    return error_response(422, str(exc))


async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error_response(exc.status_code, str(exc.detail))


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    logger.error("unexpected error", exc_info=exc)
    return error_response(500, f"internal error ({type(exc).__name__}); see the server log")


# --- app --------------------------------------------------------------------------------------
def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    """The ASGI app. Without ``engine``, the lifespan starts one in the background (and stops it
    at shutdown); a started ``engine`` passed in is used as is and left running."""
    state = EngineState(settings, engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if state.engine is None:
            state.began = time.perf_counter()
            state.task = asyncio.create_task(state.start(), name="ivonserve-engine-start")
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
    app.state.settings = settings
    app.state.created = int(time.time())
    app.state.generate_service = GenerateService(settings, state)
    app.include_router(router)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(IvonserveError, _ivonserve_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    return app


def _check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise IvonserveError(f"cannot listen on {host}:{port}: {err.strerror}") from None


def serve(settings: Settings) -> int:
    """Print the settings, run uvicorn until stopped; a failed engine start exits with an error."""
    import uvicorn

    from ivonserve.posterior import METADATA

    logging.basicConfig(
        level=getattr(logging, settings.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("ivonserve").setLevel(getattr(logging, settings.log_level.upper()))
    print("ivonserve settings:\n" + settings.summary(), flush=True)
    if not (settings.posterior / METADATA).is_file():
        raise IvonserveError(
            f"{settings.posterior}: no posterior there ({METADATA} missing); train one with "
            f"`ivonserve train` or pass --posterior DIR"
        )
    _check_port(settings.host, settings.port)
    app = create_app(settings)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            timeout_graceful_shutdown=5,
        )
    )

    def fatal() -> None:
        server.should_exit = True

    app.state.engine_state.on_fatal = fatal
    print(f"ivonserve: http://{settings.host}:{settings.port} (ready at /ready)", flush=True)
    server.run()
    if app.state.engine_state.error is not None:
        raise IvonserveError(f"the engine failed to start: {app.state.engine_state.error}")
    return 0


if __name__ == "__main__":  # engine processes are spawned: keep the guard
    from ivonserve.cli import main

    sys.exit(main(["serve", *sys.argv[1:]]))
