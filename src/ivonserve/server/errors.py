"""The one error path: every error the server answers, in a response or inside a stream, is
built here, and every exception is mapped to its HTTP status here.

The body is OpenAI's ``{"error": {"message", "type", "param", "code"}}`` (vLLM's too), so the
OpenAI client raises its matching exception. A stream that fails after it began cannot change
its status any more: it sends the same body as a ``data:`` event, then ``[DONE]``.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ivonserve.errors import EngineError, InvalidRequest, IvonserveError
from ivonserve.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger("ivonserve.server")

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    413: "RequestTooLargeError",
    422: "BadRequestError",
    429: "RateLimitError",
    503: "ServiceUnavailableError",
    504: "TimeoutError",
}


class ApiError(Exception):
    """An error answered as ``ErrorResponse`` with its HTTP status (and headers, if any)."""

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

    def body(self) -> ErrorResponse:
        kind = _TYPES.get(self.status, "InternalServerError" if self.status >= 500 else "Error")
        info = ErrorInfo(message=self.message, type=kind, param=self.param, code=self.status)
        return ErrorResponse(error=info)

    def response(self) -> JSONResponse:
        return JSONResponse(
            self.body().model_dump(), status_code=self.status, headers=self.headers or None
        )


def api_error(exc: BaseException) -> ApiError:
    """The HTTP error of any exception: the mapping, in one place. What is not ivonserve's own
    is a 500 naming only its type (the traceback goes to the log, never to the client)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, InvalidRequest):
        return ApiError(422, f"{exc.field}: {exc}", exc.field)
    if isinstance(exc, EngineError):
        return ApiError(503, str(exc))
    if isinstance(exc, IvonserveError):
        return ApiError(422, str(exc))
    if isinstance(exc, StarletteHTTPException):
        return ApiError(exc.status_code, str(exc.detail), headers=exc.headers)
    logger.error("unexpected error", exc_info=exc)
    return ApiError(500, f"internal error ({type(exc).__name__}); see the server log")


def validation_error(exc: RequestValidationError) -> ApiError:
    """A 422 naming every invalid field (the first as ``param``)."""
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
    return ApiError(422, "; ".join(messages) or "invalid request", first)


def _field(loc: tuple | list) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts) or "body"


def add_error_handlers(app: FastAPI) -> None:
    """Every exception a route raises becomes ``api_error(exc).response()``."""

    async def validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    async def mapped(_: Request, exc: Exception) -> JSONResponse:
        return api_error(exc).response()

    app.add_exception_handler(RequestValidationError, validation)
    for kind in (ApiError, IvonserveError, StarletteHTTPException, Exception):
        app.add_exception_handler(kind, mapped)
