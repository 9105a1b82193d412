"""The exceptions users see as one line (CLI) or as a 4xx/503 (HTTP), never as a stack trace.

``server/errors.py`` maps each to its HTTP status, in one place.
"""


class IvonserveError(Exception):
    """A user-facing error: bad file, bad flag, bad model. The CLI prints it as one line."""


class InvalidRequest(IvonserveError):
    """A request the engine cannot run as asked (HTTP 422); ``field`` names the culprit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class EngineError(IvonserveError):
    """The engine cannot serve: it failed to start, or died (HTTP 503)."""


class EngineNotReady(EngineError):
    """The engine is still starting, or has stopped (HTTP 503)."""
