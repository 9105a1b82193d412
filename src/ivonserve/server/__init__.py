"""The HTTP server: ``app`` (factory, routes, ``serve``), ``serving`` (the work behind the
generation routes), ``limits`` (admission), ``metrics`` (Prometheus), ``middleware`` (request
id, auth, body limit, access log)."""

from ivonserve.server.app import EngineState, create_app, serve, start_draining
from ivonserve.server.serving import ApiError, GenerationService

__all__ = ["ApiError", "EngineState", "GenerationService", "create_app", "serve", "start_draining"]
