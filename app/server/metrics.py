"""The server's Prometheus metrics (``GET /metrics``), in a registry of the app's own (not
prometheus-client's global one: two apps in one process, as in the tests, don't collide).

- ``hearth_requests_total{endpoint, status}``: every HTTP request by route and status
  (counted by an ASGI middleware outside the API-key gate, so 401s and 413s count too);
  unknown paths are one ``endpoint="other"``, so a scanner can't grow the label set.
- ``hearth_time_to_first_token_seconds`` and ``hearth_inter_token_latency_seconds``
  histograms: the engine's TTFT (submit to first token) of each answer, and the gap
  between consecutive tokens as the server receives them.
- ``hearth_prompt_tokens_total``, ``hearth_generation_tokens_total``,
  ``hearth_prompt_tokens_cached_total``: counted as in the responses' ``usage`` (a
  prompt's ``n`` choices count it once).
- Gauges read from the engine at scrape time: running and waiting requests, KV-cache
  usage (0..1) and blocks, prefix-cache hit rate (the share of prompt tokens the cache has
  served); absent while no model is loaded.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger("hearth.server")

#: Buckets for TTFT (seconds): a warm GPU answers in tens of ms, a long prompt on a CPU in seconds.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
#: Buckets for the gap between tokens (seconds): a few ms on a GPU, up to ~1 s on a slow CPU.
ITL_BUCKETS = (0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5)
#: The routes counted by name (anything else is "other").
ENDPOINTS = frozenset({"/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions",
                       "/v1/responses"})


class ServerMetrics:
    """The app's metrics; ``host`` is read at scrape time for the engine's gauges."""

    def __init__(self, host) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("hearth_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.ttft = Histogram("hearth_time_to_first_token_seconds", "time from submit to the first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("hearth_inter_token_latency_seconds", "time between consecutive tokens",
                             buckets=ITL_BUCKETS, registry=r)
        self.prompt_tokens = Counter("hearth_prompt_tokens", "prompt tokens of finished answers", registry=r)
        self.generation_tokens = Counter("hearth_generation_tokens", "tokens generated", registry=r)
        self.cached_tokens = Counter("hearth_prompt_tokens_cached", "prompt tokens the prefix cache served",
                                     registry=r)
        r.register(_EngineGauges(host))

    def answered(self, finishes: list, n: int) -> None:
        """Count one request's finished choices (``finishes``: each choice's FinishedEvent,
        None for one that never finished; ``n`` choices per prompt)."""
        for k, fin in enumerate(finishes):
            if fin is None:
                continue
            if k % n == 0:  # the prompt once, as usage counts it
                self.prompt_tokens.inc(fin.usage.prompt_tokens)
                self.cached_tokens.inc(fin.usage.cached_prompt_tokens)
            self.generation_tokens.inc(fin.usage.completion_tokens)
            if fin.usage.completion_tokens > 0 and fin.timings.ttft_ms > 0:
                self.ttft.observe(fin.timings.ttft_ms / 1e3)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineGauges:
    """A custom collector: the engine's load, read when Prometheus scrapes."""

    def __init__(self, host) -> None:
        self._host = host

    def describe(self):
        return []  # its metrics depend on whether a model is loaded: nothing fixed to check

    def collect(self):
        engine = self._host.engine
        if engine is None:
            return
        try:
            s = engine.stats()
        except Exception as e:  # a scrape must never fail because the engine can't report
            log.debug("engine stats failed: %s", e)
            return
        yield _gauge("hearth_num_requests_running", "requests the engine is running", s.num_running)
        yield _gauge("hearth_num_requests_waiting", "requests waiting for the engine", s.num_waiting)
        used = s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0
        yield _gauge("hearth_kv_cache_usage_ratio", "the share of KV-cache blocks in use (0..1)", used)
        yield _gauge("hearth_kv_cache_blocks_total", "KV-cache blocks in all", s.kv_blocks_total)
        yield _gauge("hearth_kv_cache_blocks_used", "KV-cache blocks in use", s.kv_blocks_used)
        yield _gauge("hearth_prefix_cache_hit_rate", "the share of prompt tokens served by the prefix cache "
                     "(0..1)", s.prefix_cache_hit_rate)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=float(value))


class CountRequests:
    """ASGI middleware: ``hearth_requests_total{endpoint, status}`` for every HTTP request.
    Outermost, so refusals made before any route runs (401, 413) count too; a client
    that leaves before an answer starts counts as status 499 (nginx's "client closed")."""

    def __init__(self, app, metrics: ServerMetrics) -> None:
        self.app = app
        self._metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [499]

        async def sending(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception:
            if status[0] == 499:  # a bug: the error middleware outside says it with a 500
                status[0] = 500
            raise
        finally:
            path = scope["path"]
            endpoint = path if path in ENDPOINTS else "/v1/models/{model}" if path.startswith("/v1/models/") \
                else "other"
            self._metrics.requests.labels(endpoint, str(status[0])).inc()
