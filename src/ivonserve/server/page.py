"""The consensus page (issue 32): static HTML/CSS/JS in ``server/ui/`` (package data, no build
step, nothing fetched from outside), served at ``/ui/``; ``/`` and ``/ui`` redirect there.

The page's files load without an API key (they hold nothing secret, and the key is typed into
the page: see ``middleware.PAGE_PATHS``); every API call the page makes sends
``Authorization: Bearer KEY``, so the API stays behind the key rule.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response
from starlette.types import Scope

UI_DIR = Path(__file__).with_name("ui")
# The page talks to this server only: scripts, styles and fetches from its own origin.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class PageFiles(StaticFiles):
    """The ui folder, every answer with the page's security headers."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(SECURITY_HEADERS)
        return response


def _to_page(request: Request) -> RedirectResponse:
    """To ``ui/``, relative (a proxy's path prefix is kept), with the query: a shared link
    (``/ui?prompt=...&run=1``) still fills the form and runs."""
    query = request.url.query
    return RedirectResponse(f"ui/?{query}" if query else "ui/", status_code=307)


def add_page(app: FastAPI) -> None:
    """``/`` and ``/ui`` redirect to ``/ui/``, which serves the page and its files. Left out of
    the OpenAPI schema."""

    @app.get("/", include_in_schema=False)
    async def root(request: Request) -> RedirectResponse:
        return _to_page(request)

    @app.get("/ui", include_in_schema=False)
    async def ui(request: Request) -> RedirectResponse:
        return _to_page(request)

    app.mount("/ui", PageFiles(directory=UI_DIR, html=True), name="ui")
