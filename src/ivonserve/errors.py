"""Every exception ivonserve raises on purpose, and the one mapping from fault to HTTP status.

A user sees each as one line (the CLI: ``ivonserve: error: ...``, exit 2) or as an HTTP error
``{"error": {"message", "type", "param", "code"}}`` with the status of its fault (``STATUS``),
never as a stack trace. One fault has one status wherever it is detected: an unknown posterior
is 404 whether the server or the engine finds it, a limit is 422 whichever limit it is.

Plain Python only (no web framework, no ivonserve module but ``vllm_plugin``'s one exception):
every layer raises these, and the server's handlers (``server/app.py``) turn them into
responses with ``api_error``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from ivonserve.vllm_plugin.shared import PluginError

__all__ = [
    "STATUS",
    "ApiError",
    "BodyTooLarge",
    "EngineError",
    "EngineNotReady",
    "InvalidRequest",
    "IvonserveError",
    "Overloaded",
    "PluginError",
    "PosteriorError",
    "RequestTimeout",
    "ShuttingDown",
    "Unauthorized",
    "UnknownPosterior",
    "api_error",
    "status_of",
    "validation_error",
]

logger = logging.getLogger("ivonserve.server")


class IvonserveError(Exception):
    """A user-facing error: bad file, bad flag, bad request. The CLI prints it as one line."""


class InvalidRequest(IvonserveError):
    """A request that cannot run as asked: a value out of its limits, or one vLLM refuses;
    ``field`` names the culprit (the HTTP error's ``param``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class UnknownPosterior(InvalidRequest):
    """A request names a posterior this server does not serve (its ``model``)."""

    def __init__(self, name: str, served: Iterable[str]) -> None:
        super().__init__("model", f"{name!r} is not served here; served: {', '.join(served)}")


class PosteriorError(IvonserveError):
    """A posterior folder that cannot be used; the message names the file (and key)."""


class EngineError(IvonserveError):
    """The engine cannot serve: it failed to start, or died."""


class EngineNotReady(EngineError):
    """The engine is still starting, or has stopped."""


class Overloaded(IvonserveError):
    """Every slot and every queue place is taken; ``retry_after_s`` estimates when one frees."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    @property
    def status(self) -> int:
        return status_of(self)


class ShuttingDown(Overloaded):
    """The server is draining: it takes no new work."""


class RequestTimeout(IvonserveError):
    """A request took longer than ``request_timeout_s`` (its queue time included)."""


class BodyTooLarge(IvonserveError):
    """A request body past ``max_body_bytes``."""


class Unauthorized(IvonserveError):
    """No valid API key."""


# The one mapping: the first class of an exception's MRO found here gives its status.
# PluginError (vLLM's processes refuse a vLLM the plugin does not know) reaches a client only
# as the EngineError of a failed start; it is vllm_plugin's own class, which imports nothing of
# ivonserve outside vllm_plugin (vLLM loads it in every process), re-exported here.
STATUS: Mapping[type[BaseException], int] = {
    Unauthorized: 401,
    UnknownPosterior: 404,
    BodyTooLarge: 413,
    InvalidRequest: 422,
    ShuttingDown: 503,
    Overloaded: 429,
    EngineError: 503,
    RequestTimeout: 504,
    IvonserveError: 422,
}
ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    413: "RequestTooLargeError",
    422: "BadRequestError",
    429: "RateLimitError",
    503: "ServiceUnavailableError",
    504: "TimeoutError",
}


def status_of(exc: BaseException) -> int:
    """The HTTP status of an exception: its fault's (``STATUS``), else 500."""
    for kind in type(exc).__mro__:
        if kind in STATUS:
            return STATUS[kind]
    return 500


class ApiError(Exception):
    """An error as the client gets it: status, message, ``param`` and headers. ``api_error``
    makes one of any exception; the HTTP edges raise one for a status no fault class has."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers or {}

    @property
    def type(self) -> str:
        return ERROR_TYPES.get(
            self.status, "InternalServerError" if self.status >= 500 else "Error"
        )

    def body(self) -> dict[str, Any]:
        """OpenAI's (and vLLM's) error body; ``server.protocol.ErrorResponse`` is its schema."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.status,
            }
        }

    def json(self) -> bytes:
        """The body as the server sends it (compact, as ``JSONResponse`` renders it)."""
        return json.dumps(self.body(), ensure_ascii=False, separators=(",", ":")).encode()

    def response(self) -> Any:
        """The body as a starlette ``JSONResponse`` with the status and headers."""
        from starlette.responses import JSONResponse

        return JSONResponse(self.body(), status_code=self.status, headers=self.headers or None)


def api_error(exc: BaseException) -> ApiError:
    """The HTTP error of any exception. What is not ivonserve's own is a 500 naming only its
    type (the traceback goes to the log, never to the client)."""
    if isinstance(exc, ApiError):
        return exc
    status = status_of(exc)
    if status == 500:
        logger.error("unexpected error", exc_info=exc)
        return ApiError(500, f"internal error ({type(exc).__name__}); see the server log")
    if isinstance(exc, InvalidRequest):
        return ApiError(status, f"{exc.field}: {exc}", exc.field)
    headers = {}
    if isinstance(exc, Overloaded):
        headers["Retry-After"] = str(exc.retry_after_s)
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    param = "body" if isinstance(exc, BodyTooLarge) else None
    return ApiError(status, str(exc), param, headers)


def validation_error(errors: Iterable[Mapping[str, Any]]) -> ApiError:
    """A 422 naming every invalid field of a request body (pydantic's errors; the first field
    is ``param``)."""
    messages, first = [], None
    for err in errors:
        name = _field(err.get("loc", ()))
        first = first or name
        msg = str(err.get("msg", "invalid"))
        if err.get("type") == "extra_forbidden":
            msg = "unknown field (not allowed)"
        elif err.get("type") == "missing":
            msg = "field required"
        messages.append(f"{name}: {msg}")
    return ApiError(STATUS[InvalidRequest], "; ".join(messages) or "invalid request", first)


def _field(loc: tuple | list) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts) or "body"
