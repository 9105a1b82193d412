"""The HTTP server: ``app`` (factory, thin routes), ``serving`` and ``scoring`` (the work behind
the routes), ``responses`` (the answers' shapes), ``errors`` (the one error path),
``lifecycle`` (the engine's states, ``serve``), ``limits`` (admission), ``metrics``
(Prometheus), ``middleware`` (request id, auth, body limit, access log)."""

from ivonserve.server.app import create_app
from ivonserve.server.errors import ApiError
from ivonserve.server.lifecycle import EngineState, serve, start_draining
from ivonserve.server.serving import GenerationService

__all__ = ["ApiError", "EngineState", "GenerationService", "create_app", "serve", "start_draining"]
