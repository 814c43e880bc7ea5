"""Operator endpoints: GET /metrics (Prometheus) and GET /health/detailed.

/metrics reads only process memory (or the workers' shared metric files): no database.
With METRICS_TOKEN set it needs `Authorization: Bearer <METRICS_TOKEN>`; without it, it is
open, as Prometheus endpoints usually are. /health/detailed shows internals (pids, errors),
so it needs that bearer token or a staff session, always.
"""

from __future__ import annotations

import hmac
import time
from typing import Any

from django.conf import settings
from django.core.cache import cache
from django.db import connection
from django.db.models import Prefetch
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.http import require_GET

from apps.engines.breaker import breaker
from apps.engines.models import Engine, EngineInstance
from apps.engines.scheduler_service import scheduler_stats
from apps.engines.selectors import engine_instance_statuses
from apps.observability.metrics import exposition
from apps.rag.selectors import ingestion_backlog


def _bearer_ok(request: HttpRequest) -> bool:
    token = settings.METRICS_TOKEN
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    return bool(token) and scheme.lower() == "bearer" and hmac.compare_digest(given, token)


def _denied(message: str) -> JsonResponse:
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": None}
    return JsonResponse({"error": error}, status=401, headers={"WWW-Authenticate": "Bearer"})


@require_GET
def metrics_view(request: HttpRequest) -> HttpResponse:
    if settings.METRICS_TOKEN and not _bearer_ok(request):
        return _denied("Send `Authorization: Bearer <METRICS_TOKEN>`.")
    body, content_type = exposition()
    return HttpResponse(body, content_type=content_type)


def _timed(check) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        check()
    except Exception as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"ok": True, "latency_ms": round((time.perf_counter() - started) * 1000, 1)}


def _ping_database() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


def _ping_redis() -> None:
    from django_redis import get_redis_connection

    get_redis_connection("default").ping()


def _replicas(engine: Engine) -> list[dict[str, Any]]:
    if not engine.is_managed:
        return [
            {"replica": index, "url": url, "circuit": breaker.state(engine.name, index)}
            for index, url in enumerate(engine.base_urls)
        ]
    statuses = engine_instance_statuses(engine=engine, rows=list(engine.instances.all()))
    return [
        {
            "replica": s.replica,
            "state": s.state,
            "variant": s.variant,
            "pid": s.pid,
            "in_flight": s.in_flight,
            "queued": s.queued,
            "last_error": s.last_error,
            "owner": s.owner,
            "owner_alive": s.owner_alive,
            "circuit": breaker.state(engine.name, s.replica),
        }
        for s in statuses
    ]


def _engine(engine: Engine) -> dict[str, Any]:
    stats = scheduler_stats(engine.name) or {}
    return {
        "name": engine.name,
        "kind": engine.kind,
        "flavor": engine.flavor,
        "slots_in_use": stats.get("in_flight", 0),
        "capacity": stats.get("capacity", engine.slots * engine.replica_count),
        "queued": stats.get("queued", 0),
        "replicas": _replicas(engine),
    }


@require_GET
def health_detailed_view(request: HttpRequest) -> HttpResponse:
    user = getattr(request, "user", None)
    if not _bearer_ok(request) and not (user is not None and user.is_active and user.is_staff):
        return _denied("Send `Authorization: Bearer <METRICS_TOKEN>` or sign in as staff.")
    database = _timed(_ping_database)
    payload: dict[str, Any] = {"database": database}
    if settings.REDIS_URL:
        payload["redis"] = _timed(_ping_redis)
    engines = []
    if database["ok"]:
        rows = EngineInstance.objects.select_related("variant__model", "requested_variant__model")
        queryset = Engine.objects.prefetch_related(Prefetch("instances", queryset=rows))
        engines = [_engine(engine) for engine in queryset]
    payload["engines"] = engines
    # The task queue (procrastinate, RAG ingestion) lives in the same database.
    payload["task_queue"] = ingestion_backlog() if database["ok"] else None
    payload["cache"] = {"backend": settings.CACHES["default"]["BACKEND"], "ok": _cache_ok()}
    healthy = database["ok"] and payload.get("redis", {"ok": True})["ok"]
    payload["status"] = "ok" if healthy else "down"
    return JsonResponse(payload, status=200 if healthy else 503)


def _cache_ok() -> bool:
    try:
        cache.get("health-probe")
    except Exception:
        return False
    return True
