"""The server's life: the engine's states (starting -> ready -> draining | died, or failed),
the probes that report them (/health, /ready), and the checks before anything listens
(``run.serve`` runs uvicorn with a draining SIGTERM).

The app comes up at once and answers ``/health`` (200) and ``/ready`` (503) while the engine
starts in a background task of the lifespan; ``/ready`` turns 200 once vLLM is up and every pool
registered. A watchdog turns ``/ready`` back to 503 and stops the server (exit code 1, for the
restart policy) if the engine dies later. On SIGTERM the server drains: no new connections,
in-flight requests run up to ``drain_timeout_s``, the rest are aborted, exit code 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ivonserve.config import Settings
from ivonserve.engine import Engine
from ivonserve.errors import EngineNotReady, IvonserveError
from ivonserve.server.protocol import Health, Readiness

if TYPE_CHECKING:
    from fastapi import FastAPI

    from ivonserve.server.limits import Admission

logger = logging.getLogger("ivonserve.server")
WATCHDOG_S = 1.0
# after the engine died: /ready answers 503 and in-flight streams send their error event for
# this long before the server stops listening (a probe and every client see why)
DEATH_GRACE_S = 1.0


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
            self.engine = await Engine.start(self.settings.engine_config())
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
                await asyncio.sleep(DEATH_GRACE_S)
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
            phases = {k: round(v, 3) for k, v in self.engine.startup_seconds.items()}
            return Readiness(
                status="ready",
                startup_s=self.startup_s,
                startup_phases_s=phases,
                vllm_plugin=self.engine.plugin,
            )
        if self.stopped or self.engine is not None:
            return Readiness(status="stopped", detail="the engine is not running")
        return Readiness(
            status="starting",
            detail=f"starting for {time.perf_counter() - self.began:.0f} s",
        )

    def require(self) -> Engine:
        if self.engine is None or not self.engine.ready:
            state = self.readiness()
            raise EngineNotReady(f"the engine is not ready ({state.status}: {state.detail})")
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


def start_draining(app: FastAPI) -> None:
    """Refuse new generation work (503 with Retry-After) and fail /ready; in-flight work runs."""
    app.state.engine_state.draining = True
    app.state.admission.draining = True


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


# --- the probes -------------------------------------------------------------------------------
router = APIRouter()


@router.get("/health", response_model=Health)
async def health() -> Health:
    """The process is up (200 always); see /ready for the engine."""
    return Health()


@router.get("/ready", response_model=Readiness, responses={503: {"model": Readiness}})
async def ready(raw_request: Request) -> Any:
    """200 once the engine is started and every pool registered; 503 before, while draining,
    or after a failure."""
    state = raw_request.app.state.engine_state.readiness()
    code = 200 if state.status == "ready" else 503
    return JSONResponse(state.model_dump(), status_code=code)
