"""``GET /metrics``: the server's Prometheus metrics, in the text exposition format (``prometheus-client``).

Names follow vLLM's where the concept is the same, with a ``lopa:`` prefix, so dashboards built for vLLM need
only the prefix changed:

================================================  =========  ====================================================
metric                                            type       what
================================================  =========  ====================================================
``lopa:num_requests_running``                     gauge      HTTP requests whose sequences are in the engine
``lopa:num_requests_waiting``                     gauge      prompts queued for the engine (vLLM's requests)
``lopa:prompt_tokens_total``                      counter    prompt tokens of finished sequences (usage's)
``lopa:generation_tokens_total``                  counter    generated tokens of finished sequences (usage's)
``lopa:forwards_total``                           counter    forwards of finished sequences (usage's ``forwards``)
``lopa:tokens_per_forward``                       histogram  one observation per finished sequence (its TPF)
``lopa:time_per_iteration_seconds``               histogram  one engine iteration (one batched forward)
``lopa:time_to_first_token_seconds``              histogram  request queued → its first final token
``lopa:kv_cache_usage_perc``                      gauge      KV pool slots in use / slots (0 to 1)
``lopa:request_success_total{finished_reason}``   counter    finished sequences by ``stop`` / ``length``
``lopa:http_requests_total{method,handler,status}`` counter  every HTTP response, by route template and status
================================================  =========  ====================================================

The counters add exactly what the responses' ``usage`` objects report, so a scrape can be checked against the
traffic. Each app has its own :class:`~prometheus_client.CollectorRegistry` (never the process-global one), so
several apps in one process (the tests) keep separate counts. The engine thread reports through
:class:`~lopa.server.worker.MetricsHook`; the HTTP counter is an ASGI middleware.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lopa.errors import ConfigError
from lopa.server.worker import EngineWorker, MetricsHook

try:
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
except ImportError:  # pragma: no cover - the serve extra installs it
    CollectorRegistry = None  # type: ignore[assignment,misc]

_TPF_BUCKETS = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 64.0)
_SECONDS_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def kv_cache_usage(session: Any) -> float:
    """Fraction of the KV pool's slots held by running sequences (0.0 for a session without a pool)."""
    scheduler = getattr(session, "scheduler", None)
    if scheduler is None or not getattr(scheduler, "max_num_seqs", 0):
        return 0.0
    used = sum(1 for e in list(scheduler.running) if e.slot >= 0)
    return used / scheduler.max_num_seqs


class PrometheusMetrics(MetricsHook):
    """The engine-side metrics of one app, registered in ``registry``."""

    def __init__(self, registry: CollectorRegistry, worker: EngineWorker) -> None:
        r = registry
        running = Gauge("lopa:num_requests_running", "Requests whose sequences are in the engine.", registry=r)
        running.set_function(lambda: worker.running)
        waiting = Gauge(
            "lopa:num_requests_waiting",
            "Prompts waiting for the engine (each prompt of a request counts once).",
            registry=r,
        )
        waiting.set_function(lambda: worker.waiting)
        kv = Gauge("lopa:kv_cache_usage_perc", "KV pool usage: slots in use / slots (1 = full).", registry=r)
        kv.set_function(lambda: kv_cache_usage(worker.session))
        self.prompt_tokens = Counter("lopa:prompt_tokens", "Prompt tokens of finished sequences.", registry=r)
        self.generation_tokens = Counter(
            "lopa:generation_tokens", "Generated tokens of finished sequences.", registry=r
        )
        self.forwards = Counter("lopa:forwards", "Forwards taken by finished sequences.", registry=r)
        self.tokens_per_forward = Histogram(
            "lopa:tokens_per_forward", "Tokens per forward of each finished sequence.", buckets=_TPF_BUCKETS, registry=r
        )
        self.iteration = Histogram(
            "lopa:time_per_iteration_seconds",
            "Seconds per engine iteration (one batched forward).",
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "lopa:time_to_first_token_seconds",
            "Seconds from a request entering the queue to its first final token.",
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.success = Counter(
            "lopa:request_success", "Finished sequences by finish reason.", ["finished_reason"], registry=r
        )

    def iteration_done(self, seconds: float) -> None:
        self.iteration.observe(seconds)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def sequence_finished(self, reason: str, usage: dict) -> None:
        self.prompt_tokens.inc(usage["prompt_tokens"])
        self.generation_tokens.inc(usage["completion_tokens"])
        self.forwards.inc(usage["forwards"])
        if usage["forwards"]:
            self.tokens_per_forward.observe(usage["tokens_per_forward"])  # the engine's TPF, as in the response
        self.success.labels(finished_reason=reason).inc()


class HTTPMetricsMiddleware:
    """Counts every HTTP response by method, route template (``other`` for unknown paths) and status."""

    def __init__(self, app: ASGIApp, counter: Counter) -> None:
        self.app = app
        self.counter = counter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status: list[int] = []

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(int(message["status"]))
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            route = scope.get("route")
            handler = getattr(route, "path", None) or "other"
            code = str(status[0]) if status else "none"  # none: the client left before any response
            self.counter.labels(method=scope.get("method", ""), handler=handler, status=code).inc()


def add_metrics_route(app: FastAPI, worker: EngineWorker) -> CollectorRegistry:
    """Install ``GET /metrics``, the HTTP counter (outermost middleware) and the worker's hook; the registry."""
    if CollectorRegistry is None:
        raise ConfigError("GET /metrics needs prometheus-client: pip install 'lopa[serve]'")
    registry = CollectorRegistry(auto_describe=True)
    worker.metrics = PrometheusMetrics(registry, worker)
    http = Counter(
        "lopa:http_requests",
        "HTTP responses by method, route and status.",
        ["method", "handler", "status"],
        registry=registry,
    )
    app.add_middleware(HTTPMetricsMiddleware, counter=http)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return registry
