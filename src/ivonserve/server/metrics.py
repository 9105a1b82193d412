"""Prometheus metrics (prometheus-client) and their route, GET /metrics: one registry per app so
that several apps in one process (the tests) never share counters. Values owned elsewhere (the
admission counters, the engine's aborted requests and pools) are read at scrape time by a
collector instead of copied.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)
CONFIDENCE_BUCKETS = tuple(round(0.1 * i, 1) for i in range(1, 11))


class Metrics:
    """Every metric the server exports; ``render()`` is the /metrics body."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        r = self.registry
        self.requests = Counter(
            "ivonserve_requests", "HTTP requests answered", ["route", "status"], registry=r
        )
        self.latency = Histogram(
            "ivonserve_request_duration_seconds",
            "time from request to the last byte of the response",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.phase = Histogram(
            "ivonserve_phase_duration_seconds",
            "time a generation request spent queued for a slot, generating, and selecting",
            ["phase"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.candidates = Counter(
            "ivonserve_candidates", "candidates generated", ["model"], registry=r
        )
        self.prompt_tokens = Counter(
            "ivonserve_prompt_tokens", "prompt tokens of answered requests", ["model"], registry=r
        )
        self.generated_tokens = Counter(
            "ivonserve_generated_tokens",
            "tokens generated over all candidates",
            ["model"],
            registry=r,
        )
        self.confidence = Histogram(
            "ivonserve_confidence",
            "agreement of the candidates with the chosen answer",
            ["model"],
            buckets=CONFIDENCE_BUCKETS,
            registry=r,
        )
        self.early_stops = Counter(
            "ivonserve_early_stops",
            "generation requests whose fan-out early stopping cut short, by rule",
            ["model", "rule"],
            registry=r,
        )
        self.stopped_candidates = Counter(
            "ivonserve_stopped_candidates",
            "candidates early stopping aborted before they finished",
            ["model"],
            registry=r,
        )
        self.saved_tokens = Counter(
            "ivonserve_saved_tokens",
            "max_tokens the stopped candidates left unspent: an upper bound on the tokens early "
            "stopping saved (bench/early_stop.sh measures the actual saving against off)",
            ["model"],
            registry=r,
        )
        self.disconnects = Counter(
            "ivonserve_client_disconnects",
            "generation requests whose client went away before the answer (work aborted)",
            registry=r,
        )

    def watch(self, read: Callable[[], dict[str, Any]]) -> None:
        """Export the live gauges ``read()`` returns at each scrape (see ``LiveCollector``)."""
        self.registry.register(LiveCollector(read))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class LiveCollector(Collector):
    """Gauges and counters read at scrape time from a snapshot dict:
    ``in_flight``, ``queued``, ``ready`` (0/1), ``aborted`` (engine requests aborted) and
    ``pools`` ({name: size})."""

    def __init__(self, read: Callable[[], dict[str, Any]]) -> None:
        self.read = read

    def collect(self) -> Iterator[Metric]:
        now = self.read()
        yield _gauge(
            "ivonserve_requests_in_flight", "generation requests on the engine", now["in_flight"]
        )
        yield _gauge(
            "ivonserve_requests_queued", "generation requests waiting for a slot", now["queued"]
        )
        yield _gauge("ivonserve_engine_ready", "1 when the engine serves requests", now["ready"])
        aborted = CounterMetricFamily(
            "ivonserve_aborted_engine_requests",
            "vLLM requests aborted because their HTTP request was cancelled or timed out",
        )
        aborted.add_metric([], now["aborted"])
        yield aborted
        pools = GaugeMetricFamily(
            "ivonserve_pool_size", "posterior draws loaded as LoRA slots", labels=["model"]
        )
        for name, size in now["pools"].items():
            pools.add_metric([name], size)
        yield pools


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


router = APIRouter()


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def metrics(raw_request: Request) -> Response:
    """Prometheus metrics (text exposition format)."""
    return Response(raw_request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
