"""The gateway's Prometheus metrics (prometheus-client), served at GET /metrics.

Several uvicorn workers: `serve` gives them one PROMETHEUS_MULTIPROC_DIR (under the data
dir, one per serve run) before they start, so prometheus-client's multiprocess mode keeps
every worker's values in memory-mapped files and /metrics, answered by any worker, adds
them up. One worker (or a test process) keeps them in memory. Which mode a process uses
is fixed when prometheus-client is first imported, so MULTIPROC_DIR below is read then.

Requests are recorded once, from the pipeline's settle step: a few counter and histogram
updates in memory, no database work. README ("Metrics") lists every metric.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROC_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
LOAD_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
RATE_BUCKETS = (1, 5, 10, 20, 50, 100, 200, 500, 1000)

REQUESTS = Counter(
    "gateway_requests",
    "Requests on /v1, by endpoint, model (the one that served), tenant and HTTP status.",
    ["endpoint", "model", "tenant", "status"],
)
DURATION = Histogram(
    "gateway_request_duration_seconds",
    "Time from the request's arrival to its last byte.",
    ["endpoint", "model"],
    buckets=LATENCY_BUCKETS,
)
TTFT = Histogram(
    "gateway_time_to_first_token_seconds",
    "Time from the request's arrival to the first generated token.",
    ["endpoint", "model"],
    buckets=LATENCY_BUCKETS,
)
TOKENS = Counter(
    "gateway_tokens",
    "Tokens processed, by model, tenant and kind (prompt or completion).",
    ["model", "tenant", "kind"],
)
TOKENS_PER_SECOND = Histogram(
    "gateway_tokens_per_second",
    "Generation speed of an answer: completion tokens over first-to-last-token time.",
    ["model"],
    buckets=RATE_BUCKETS,
)
IN_FLIGHT = Gauge(
    "gateway_engine_in_flight",
    "Requests an engine is serving now.",
    ["engine"],
    multiprocess_mode="livesum",
)
QUEUED = Gauge(
    "gateway_engine_queued",
    "Requests waiting for a slot on an engine (or for it to start).",
    ["engine"],
    multiprocess_mode="livesum",
)
ENGINE_STARTS = Counter("gateway_engine_starts", "Managed engine processes launched.", ["engine"])
ENGINE_SWAPS = Counter(
    "gateway_engine_swaps",
    "Managed engine replicas switched (reason: request, crash, idle, stop, start, restart).",
    ["engine", "reason"],
)
ENGINE_CRASHES = Counter(
    "gateway_engine_crashes", "Managed engine processes that exited unexpectedly.", ["engine"]
)
ENGINE_LOAD = Histogram(
    "gateway_engine_load_duration_seconds",
    "Time from launching a managed engine to its first healthy answer.",
    ["engine"],
    buckets=LOAD_BUCKETS,
)
QUOTA_REFUSALS = Counter(
    "gateway_quota_refusals", "Requests refused by a token quota (429).", ["tenant"]
)
RATE_LIMIT_REFUSALS = Counter(
    "gateway_rate_limit_refusals", "Requests refused by a rate limit (429).", ["tenant"]
)
SAFETY_EVENTS = Counter(
    "gateway_safety_events", "Safety checks that flagged or blocked a request.", ["action"]
)
CACHE_LOOKUPS = Counter(
    "gateway_cache_lookups", "Response cache lookups (result: hit or miss).", ["result"]
)
RETRIES = Counter(
    "gateway_engine_retries", "Engine calls retried before the first byte.", ["engine"]
)
FALLBACKS = Counter(
    "gateway_model_fallbacks", "Requests served by a fallback model.", ["model", "fallback"]
)
CIRCUIT_OPENS = Counter(
    "gateway_circuit_opens", "Times an engine replica's circuit breaker opened.", ["engine"]
)


def exposition() -> tuple[bytes, str]:
    """The metrics page: every worker's values when they share a directory."""
    if MULTIPROC_DIR is None:
        from prometheus_client import REGISTRY

        return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=MULTIPROC_DIR)
    return generate_latest(registry), CONTENT_TYPE_LATEST


_children: dict[tuple, Any] = {}


def child(metric: Any, *labels: str) -> Any:
    """`metric.labels(*labels)`, looked up once: prometheus-client validates the labels and
    takes a lock on every labels() call, several times per request otherwise."""
    key = (metric, labels)
    found = _children.get(key)
    if found is None:
        found = _children[key] = metric.labels(*labels)
    return found
