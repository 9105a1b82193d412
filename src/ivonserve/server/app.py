"""The FastAPI app's factory: the engine's state and the services, each feature's router, the
error handlers, the middleware and the consensus page. The routes are the features' (``generate``,
``score``, ``openai``; the probes ``lifecycle``'s, /metrics ``metrics``'s).
"""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ivonserve import __version__
from ivonserve.config import Settings
from ivonserve.engine import Engine
from ivonserve.errors import ApiError, IvonserveError, api_error, validation_error
from ivonserve.server import lifecycle, metrics
from ivonserve.server.generate import router as generate
from ivonserve.server.generate.serving import GenerationService
from ivonserve.server.lifecycle import EngineState
from ivonserve.server.limits import Admission
from ivonserve.server.metrics import Metrics
from ivonserve.server.middleware import RequestContext
from ivonserve.server.openai import router as openai
from ivonserve.server.page import add_page
from ivonserve.server.score import router as score
from ivonserve.server.score.serving import ScoringService


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    """The ASGI app. Without ``engine``, the lifespan starts one in the background (and stops it
    at shutdown); a started ``engine`` passed in is used as is and left running."""
    state = EngineState(settings, engine)
    admission = Admission(settings.max_in_flight, settings.max_queued)
    registry = Metrics()
    registry.watch(lambda: state.snapshot(admission))

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

    app = FastAPI(
        title="ivonserve",
        version=__version__,
        description="Test-time scaling with IVON posterior draws as vLLM LoRA slots and MBR.",
        lifespan=lifespan,
    )
    app.state.engine_state = state
    app.state.admission = admission
    app.state.metrics = registry
    app.state.settings = settings
    app.state.created = int(time.time())
    app.state.generation = GenerationService(settings, state.require, admission, registry)
    app.state.scoring = ScoringService(settings, state.require, admission, registry)
    for router in (
        lifecycle.router,
        metrics.router,
        openai.models_router,
        generate.router,
        score.router,
        openai.router,
    ):
        app.include_router(router)
    add_page(app)  # the consensus page at /ui/ (issue 32)
    add_error_handlers(app)
    app.add_middleware(
        RequestContext,
        metrics=registry,
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


def add_error_handlers(app: FastAPI) -> None:
    """Every exception a route raises becomes its ``errors.api_error`` response: a body that
    fails validation is a 422 naming every field, starlette's own errors (404, 405) keep their
    status."""

    async def validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc.errors()).response()

    async def http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return ApiError(exc.status_code, str(exc.detail), headers=exc.headers).response()

    async def mapped(_: Request, exc: Exception) -> JSONResponse:
        return api_error(exc).response()

    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(StarletteHTTPException, http)
    # ivonserve's own faults are answered here; a handler of Exception alone would answer them
    # too, but starlette's outermost middleware re-raises what it handled (a logged traceback)
    for kind in (ApiError, IvonserveError, Exception):
        app.add_exception_handler(kind, mapped)
