"""``serve``: the settings printed, the checks before anything listens (the port, the base
model, every posterior), then uvicorn until SIGTERM/SIGINT, which drains: no new connections,
in-flight requests run up to ``drain_timeout_s``, the rest are aborted, exit code 0. If the
engine dies while serving, the server stops with exit code 1 (for the restart policy).
"""

from __future__ import annotations

import logging
import signal
import socket
from typing import Any

from ivonserve.config import Settings
from ivonserve.errors import IvonserveError
from ivonserve.server.app import create_app
from ivonserve.server.lifecycle import check_before_start, start_draining

logger = logging.getLogger("ivonserve.server")
EXIT_ENGINE_DIED = 1


def _check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise IvonserveError(f"cannot listen on {host}:{port}: {err.strerror}") from None


def serve(settings: Settings) -> int:
    """Print the settings, run uvicorn until stopped. Exit codes: 0 after SIGTERM/SIGINT (drained),
    1 if the engine died while serving; a failed start raises (exit 2 from the CLI)."""
    import uvicorn

    logging.basicConfig(
        level=getattr(logging, settings.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("ivonserve").setLevel(getattr(logging, settings.log_level.upper()))
    print("ivonserve settings:\n" + settings.summary(), flush=True)
    _check_port(settings.host, settings.port)
    check_before_start(settings)
    app = create_app(settings)

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if not self.should_exit:
                logger.info("signal %d: draining (up to %.0f s)", sig, settings.drain_timeout_s)
            start_draining(app)
            super().handle_exit(sig, frame)

    server = DrainingServer(
        uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            access_log=False,  # ivonserve.access logs one structured line per request
            timeout_graceful_shutdown=settings.drain_timeout_s,
        )
    )

    def fatal() -> None:
        server.should_exit = True

    app.state.engine_state.on_fatal = fatal
    # uvicorn re-raises the signal it caught once it has shut down; with the default SIGTERM
    # handler that would kill the drained process with status 143 instead of exiting 0
    signal.signal(signal.SIGTERM, lambda *_: None)
    print(f"ivonserve: http://{settings.host}:{settings.port} (ready at /ready)", flush=True)
    server.run()
    state = app.state.engine_state
    if state.died:
        print(f"ivonserve: error: {state.error}", flush=True)
        return EXIT_ENGINE_DIED
    if state.error is not None:
        raise IvonserveError(f"the engine failed to start: {state.error}")
    return 0
