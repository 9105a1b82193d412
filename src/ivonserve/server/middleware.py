"""One pure-ASGI middleware for what every request shares: its id (echoed as ``x-request-id``),
API-key auth, the body read within its size limit (``limits.check_body_size``), the request
counter and latency histogram, and one structured log line. Pure ASGI (not
``BaseHTTPMiddleware``) so streaming responses and the handlers' wait for ``http.disconnect``
pass through untouched.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from ivonserve.errors import BodyTooLarge, IvonserveError, Unauthorized, api_error
from ivonserve.server.limits import check_body_size
from ivonserve.server.metrics import Metrics

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

access_log = logging.getLogger("ivonserve.access")
OPEN_PATHS = frozenset({"/health", "/ready"})  # probes work without a key
# the consensus page's static files (server/page.py) load without a key: the key is typed into
# the page, which sends it with every API call it makes
PAGE_PATHS = frozenset({"/", "/ui"})
PAGE_PREFIX = "/ui/"
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class RequestContext:
    """Wraps the app: ``scope["state"]["log"]`` is a dict the handler fills with the fields of
    the request's log line (n_models, n_samples, tokens, timings)."""

    def __init__(
        self, app: ASGIApp, metrics: Metrics, api_keys: list[str], max_body_bytes: int
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.keys = [key.encode() for key in api_keys]
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        request_id = _request_id(scope)
        fields: dict[str, Any] = {}
        scope.setdefault("state", {}).update(request_id=request_id, log=fields)
        status = 500
        header = (b"x-request-id", request_id.encode())

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        try:
            try:
                if not self._authorized(scope):
                    raise Unauthorized(
                        "a valid API key is required: send `Authorization: Bearer KEY`"
                    )
                receive = await self._bounded_body(scope, receive)
            except (Unauthorized, BodyTooLarge) as err:
                await _error(send_with_id, err)
            else:
                await self.app(scope, receive, send_with_id)
        finally:
            self._record(scope, request_id, status, time.perf_counter() - began, fields)

    def _authorized(self, scope: Scope) -> bool:
        if not self.keys or scope["path"] in OPEN_PATHS or scope["method"] == "OPTIONS":
            return True
        if scope["path"] in PAGE_PATHS or scope["path"].startswith(PAGE_PREFIX):
            return True
        given = _header(scope, b"authorization") or b""
        scheme, _, token = given.partition(b" ")
        token = token.strip() if scheme.lower() == b"bearer" else b""
        # every key compared in full, in constant time: neither timing nor order leaks a key
        matches = [hmac.compare_digest(token, key) for key in self.keys]
        return bool(token) and any(matches)

    async def _bounded_body(self, scope: Scope, receive: Receive) -> Receive:
        """Read the body up to the limit, then replay it: an oversized body is refused before
        any of it is parsed, and later ``receive`` calls still see the client's disconnect."""
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit():
            check_body_size(int(declared), self.max_body_bytes)
        if scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            return receive
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return _replay([message], receive)
            chunk = message.get("body", b"")
            size += len(chunk)
            check_body_size(size, self.max_body_bytes)
            chunks.append(chunk)
            more = message.get("more_body", False)
        return _replay([{"type": "http.request", "body": b"".join(chunks)}], receive)

    def _record(
        self, scope: Scope, request_id: str, status: int, seconds: float, fields: dict[str, Any]
    ) -> None:
        route = getattr(scope.get("route"), "path", None) or "other"  # no label per unknown path
        self.metrics.requests.labels(route, str(status)).inc()
        self.metrics.latency.labels(route).observe(seconds)
        line = {
            "event": "request",
            "id": request_id,
            "method": scope["method"],
            "route": route,
            "status": status,
            "total_s": round(seconds, 4),
            **fields,
        }
        access_log.info(json.dumps(line, separators=(",", ":")))


def _replay(messages: list[Message], receive: Receive) -> Receive:
    async def replayed() -> Message:
        return messages.pop(0) if messages else await receive()

    return replayed


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value
    return None


def _request_id(scope: Scope) -> str:
    """The client's ``x-request-id`` when it is a sane token (to trace a call end to end)."""
    given = (_header(scope, b"x-request-id") or b"").decode("latin-1")
    return given if _CLIENT_ID.fullmatch(given) else uuid.uuid4().hex


async def _error(send: Send, exc: IvonserveError) -> None:
    """An error answered before the app runs (no key, a body too large)."""
    err = api_error(exc)
    body = err.json()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
