"""Replicas beyond one machine: ivonserve's own FastAPI app as a Ray Serve deployment.

One replica is one vLLM engine holding the mean and all K draws; a request's fan-out never leaves
its replica, so replicas are stateless. The draws are a function of (posterior, pool seed), so
every replica serves the same pool, and a seeded request gets the same answer from any of them:
Ray Serve's router needs no stickiness.

* ``IvonserveReplica``: ``@serve.ingress`` of the app ``create_app`` builds (not a second server):
  the replica starts its engine before it takes traffic (an async app builder, then Serve's
  first health check, which is ``/ready``'s test), answers with an ``x-ivonserve-replica``
  header, fails its health check once its engine died (Serve replaces it), and on scale-down
  refuses new work and lets what runs finish (``graceful_shutdown_timeout_s`` =
  ``drain_timeout_s``) before the engine stops.
* ``build_app(args)``: the application from a flat dict: ivonserve's settings by field name (the
  keys of ``ivonserve serve --config``; ``IVONSERVE_*`` variables apply too) plus the replica
  keys below. It is the ``import_path`` of a ``serve run`` / RayService config file
  (``deploy/ray/serve-config.yaml``).
* ``serve_ray(...)``: ``ivonserve serve-ray``: starts (or, with ``RAY_ADDRESS``, joins) a Ray
  cluster, runs the application on ``host:port`` and blocks until SIGTERM/SIGINT.

Replica keys: ``num_replicas`` (default 1), or ``min_replicas`` and ``max_replicas`` for Serve's
autoscaling (``target_ongoing_requests`` = max_in_flight); ``num_cpus`` (default 1) and
``num_gpus`` (default 0) per replica.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

from ray import serve

from ivonserve.config import Settings
from ivonserve.engine import Engine
from ivonserve.errors import ApiError
from ivonserve.server.app import create_app
from ivonserve.server.lifecycle import start_draining

logger = logging.getLogger("ivonserve.ray")
REPLICA_HEADER = b"x-ivonserve-replica"
REPLICA_KEYS = ("num_replicas", "min_replicas", "max_replicas", "num_cpus", "num_gpus")
HEALTH_CHECK_PERIOD_S = 5.0
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "ivonserve.ray_serve:proxy_middlewares"
BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"  # vLLM's CPU worker: the cores of its OpenMP threads


class ReplicaHeader:
    """Pure ASGI: every response names the replica (``replica id; pid``) that answered it."""

    def __init__(self, app: Any, replica: str) -> None:
        self.server_app = app
        self.header = (REPLICA_HEADER, replica.encode())

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.server_app(scope, receive, send)
            return

        async def send_named(message: Any) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), self.header]
            await send(message)

        await self.server_app(scope, receive, send_named)


class ProxyErrors:
    """At Ray's HTTP proxy: a failure of the proxy itself becomes ivonserve's JSON error, 503
    with Retry-After, saying what happened. When the replica holding a request dies, Ray's
    proxy answers nothing (uvicorn then sends a bare "500 Internal Server Error"); an exception
    or a plain-text 5xx of the proxy is treated alike. ivonserve's own errors are JSON and pass
    untouched."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held: dict[str, Any] = {}
        started = False

        async def send_checked(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start" and _proxy_failure(message):
                held["start"], held["body"] = message, b""
                return
            if "start" not in held:
                started = True
                await send(message)
                return
            held["body"] += message.get("body", b"")
            if not message.get("more_body"):
                await _lost(scope, receive, send, held["body"].decode(errors="replace"))

        try:
            await self.app(scope, receive, send_checked)
        except Exception as err:
            if started:
                raise
            await _lost(scope, receive, send, f"{type(err).__name__}: {err}")
            return
        if not started and "start" not in held:
            await _lost(scope, receive, send, "Ray's proxy got no response from it")


async def _lost(scope: Any, receive: Any, send: Any, reason: str) -> None:
    reason = " ".join(reason.split())[:200] or "no detail"
    error = ApiError(
        503,
        f"the replica serving this request was lost ({reason}); Ray Serve replaces it: retry",
        headers={"Retry-After": "5"},
    )
    await error.response()(scope, receive, send)


def _proxy_failure(start: Any) -> bool:
    headers = dict(start.get("headers", []))
    return start["status"] >= 500 and b"json" not in headers.get(b"content-type", b"")


def proxy_middlewares() -> list[Any]:
    """RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=ivonserve.ray_serve:proxy_middlewares"""
    from starlette.middleware import Middleware

    return [Middleware(ProxyErrors)]


@serve.deployment(health_check_period_s=HEALTH_CHECK_PERIOD_S)
@serve.ingress()
class IvonserveReplica:
    """One replica: an engine with its pools, and ivonserve's app in front of it."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = Settings.build(**settings)
        # not `app`: Serve's ASGI wrapper owns that name
        self.engine: Engine | None = None
        self.server_app: Any = None
        context = serve.get_replica_context()
        self.replica_name = f"{context.replica_id.unique_id}; pid {os.getpid()}"
        self.cpus = pin_engine_threads(context.rank.local_rank, _assigned_cpus())

    async def __serve_build_asgi_app__(self) -> Any:
        """Start the engine first: Serve routes to a replica only once this returns and its
        first health check passes, so no client meets a starting replica."""
        self.engine = await Engine.start(self.settings.engine_config())
        self.server_app = create_app(self.settings, engine=self.engine)
        self.server_app.add_middleware(ReplicaHeader, replica=self.replica_name)
        logger.info("replica %s ready (%s; vLLM's threads on cores %s)", self.replica_name,
                    self.engine.startup_seconds, self.cpus or "vLLM's choice")  # fmt: skip
        return self.server_app

    async def check_health(self) -> None:
        """Serve's health check: the engine is up (a dead one makes Serve replace the replica)."""
        if self.engine is None or not self.engine.ready:
            raise RuntimeError(f"replica {self.replica_name}: the vLLM engine is not ready")

    async def __del__(self) -> None:
        """Scale-down or shutdown: Serve has let in-flight requests finish (up to
        graceful_shutdown_timeout_s); refuse anything late, then stop the engine."""
        if self.server_app is not None:
            start_draining(self.server_app)
        if self.engine is not None:
            await self.engine.shutdown()


def pin_engine_threads(local_rank: int, cpus_per_replica: int) -> str | None:
    """Give the replica's vLLM worker its own cores: replica r of a node takes cores
    r*n .. r*n+n-1 of the ones this process may use (VLLM_CPU_OMP_THREADS_BIND, read when the
    engine's processes start). Without it every replica's worker binds its OpenMP threads to
    the same cores by vLLM's own choice (the last core is left to the scheduler), and N replicas
    on one machine share one replica's compute. Nothing is pinned on a GPU, when the user set
    the variable, or when the node has too few cores for this rank; returns the cores pinned."""
    if os.environ.get(BIND_ENV) or cpus_per_replica < 1:
        return None
    from vllm.platforms import current_platform

    cores = sorted(os.sched_getaffinity(0))
    mine = cores[local_rank * cpus_per_replica : (local_rank + 1) * cpus_per_replica]
    if not current_platform.is_cpu() or len(mine) < cpus_per_replica:
        return None
    os.environ[BIND_ENV] = ",".join(map(str, mine))
    return os.environ[BIND_ENV]


def _assigned_cpus() -> int:
    """Whole CPUs Ray gave this replica (its ``num_cpus``)."""
    import ray

    return int(ray.get_runtime_context().get_assigned_resources().get("CPU", 0))


def deployment_options(settings: Settings, replicas: dict[str, Any]) -> dict[str, Any]:
    """Serve's options of the replica deployment from the replica keys and the settings."""
    options: dict[str, Any] = {
        "ray_actor_options": {
            "num_cpus": float(replicas.get("num_cpus", 1)),
            "num_gpus": float(replicas.get("num_gpus", 0)),
        },
        # ivonserve's own admission answers 429 past its limits; Serve must not queue before it
        "max_ongoing_requests": settings.max_in_flight + settings.max_queued,
        "graceful_shutdown_timeout_s": settings.drain_timeout_s,
    }
    if "min_replicas" in replicas or "max_replicas" in replicas:
        low = int(replicas.get("min_replicas", 1))
        options["autoscaling_config"] = {
            "min_replicas": low,
            "max_replicas": int(replicas.get("max_replicas", max(low, 1))),
            "target_ongoing_requests": settings.max_in_flight,
        }
    else:
        options["num_replicas"] = int(replicas.get("num_replicas", 1))
    return options


def application(settings: Settings, replicas: dict[str, Any]) -> Any:
    """The Serve application: every replica gets the settings resolved here (flags, environment
    and file already applied), so replicas on other nodes need none of them."""
    settings.posterior_specs()  # a malformed --posterior is one line before Ray starts
    resolved = settings.model_dump(mode="json", exclude={"config"})
    return IvonserveReplica.options(**deployment_options(settings, replicas)).bind(resolved)


def build_app(args: dict[str, Any]) -> Any:
    """The ``import_path`` of a Serve config file: its ``args`` are ivonserve's settings by
    field name plus the replica keys."""
    args = dict(args or {})
    replicas = {key: args.pop(key) for key in REPLICA_KEYS if key in args}
    return application(Settings.build(**args), replicas)


def serve_ray(settings: Settings, replicas: dict[str, Any], address: str | None = None) -> int:
    """Run the application on a Ray cluster (a local one that lives as long as this call, or
    the one at ``address`` / RAY_ADDRESS) until SIGTERM or SIGINT; exit code 0."""
    import ray

    app = application(settings, replicas)
    # a local cluster's proxy inherits it (set it on the nodes of an existing cluster)
    os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)
    ray.init(address=address or os.environ.get("RAY_ADDRESS"), include_dashboard=False)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(app, name="ivonserve", route_prefix="/")
        print(f"ivonserve on Ray Serve: http://{settings.host}:{settings.port}", flush=True)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
