"""Reads about engines for the admin: each managed replica's published state, and each
engine's prompt-cache hit rate from the request logs."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db.models import Q, Sum
from django.db.models.functions import Coalesce
from django.utils import timezone

from apps.engines.models import Engine, EngineInstance
from apps.request_logs.models import RequestLog

CACHE_RECENT_WINDOW = timedelta(hours=24)
# Only requests that generate go through llama.cpp's prompt (KV) cache; embeddings and
# rerank would count prompt tokens that never could have been cached.
CACHE_ENDPOINTS = ("chat.completions", "completions")


@dataclass(frozen=True)
class InstanceStatus:
    replica: int
    state: str
    variant: str
    pid: int | None
    port: int | None
    base_url: str
    uptime: timedelta | None
    in_flight: int
    queued: int
    last_error: str
    log_tail: str
    owner: str
    owner_alive: bool
    requested_action: str
    requested_variant: str
    heartbeat_at: datetime | None

    @property
    def uptime_text(self) -> str:
        if self.uptime is None:
            return ""
        seconds = int(self.uptime.total_seconds())
        hours, rest = divmod(seconds, 3600)
        minutes, seconds = divmod(rest, 60)
        return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {seconds:02d} s"

    @property
    def summary(self) -> str:
        """One line for the engine list: `#0 running gemma ctx=4096`."""
        return " ".join(part for part in (f"#{self.replica}", self.state, self.variant) if part)


def _owner_alive(row: EngineInstance, now: datetime) -> bool:
    stale = timedelta(seconds=settings.ENGINE_OWNER_STALE_SECONDS)
    return bool(row.owner_pid and row.heartbeat_at and now - row.heartbeat_at < stale)


def _status(row: EngineInstance, now: datetime) -> InstanceStatus:
    alive = _owner_alive(row, now)
    running = alive and row.state in (EngineInstance.State.RUNNING, EngineInstance.State.DRAINING)
    return InstanceStatus(
        replica=row.replica,
        # A state published by a process that stopped heartbeating is not believed.
        state=row.state if alive or row.state == EngineInstance.State.FAILED else "stopped",
        variant=row.variant.label if row.variant else "",
        pid=row.pid if alive else None,
        port=row.port if alive else None,
        base_url=row.base_url if alive else "",
        uptime=now - row.started_at if running and row.started_at else None,
        in_flight=row.in_flight + row.remote_in_flight if alive else 0,
        queued=row.queued if alive else 0,
        last_error=row.last_error,
        log_tail=row.log_tail,
        owner=f"pid {row.owner_pid} on {row.owner_host}" if alive else "",
        owner_alive=alive,
        requested_action=row.requested_action,
        requested_variant=row.requested_variant.label if row.requested_variant else "",
        heartbeat_at=row.heartbeat_at,
    )


def engine_instance_statuses(
    *, engine: Engine, rows: list[EngineInstance] | None = None
) -> list[InstanceStatus]:
    """Every replica of a managed engine, replica 0 first; never-used ones as stopped.

    `rows` are the engine's instances when already fetched (a prefetch on a list page)."""
    if rows is None:
        rows = list(
            EngineInstance.objects.filter(engine=engine).select_related(
                "variant__model", "requested_variant__model"
            )
        )
    now = timezone.now()
    by_replica = {row.replica: row for row in rows}
    count = max([engine.replicas, *(replica + 1 for replica in by_replica)])
    return [
        _status(by_replica.get(replica) or EngineInstance(engine=engine, replica=replica), now)
        for replica in range(count)
    ]


@dataclass(frozen=True)
class CacheHitRate:
    """Prompt tokens an engine served from its prompt cache, recently and in all time."""

    recent_prompt_tokens: int = 0
    recent_cached_tokens: int = 0
    total_prompt_tokens: int = 0
    total_cached_tokens: int = 0

    @property
    def recent(self) -> float | None:
        """Cached / prompt tokens over CACHE_RECENT_WINDOW (0..1); None without requests."""
        return _ratio(self.recent_cached_tokens, self.recent_prompt_tokens)

    @property
    def total(self) -> float | None:
        return _ratio(self.total_cached_tokens, self.total_prompt_tokens)


def _ratio(cached: int, prompt: int) -> float | None:
    return min(1.0, cached / prompt) if prompt else None


def engine_cache_hit_rates(
    *, engine_names: Iterable[str], now: datetime | None = None
) -> dict[str, CacheHitRate]:
    """Each named engine's prompt-cache hit rate over the last CACHE_RECENT_WINDOW and all
    time, in one query; engines without requests are left out (CacheHitRate() is zero).

    Requests whose usage the gateway estimated (the engine sent none, or the client left
    first) are not counted: their cached tokens are unknown, not zero."""
    recent = Q(created_at__gte=(now or timezone.now()) - CACHE_RECENT_WINDOW)
    rows = (
        RequestLog.objects.filter(
            engine__in=list(engine_names), endpoint__in=CACHE_ENDPOINTS, usage_estimated=False
        )
        .order_by()
        .values("engine")
        .annotate(
            recent_prompt=Coalesce(Sum("prompt_tokens", filter=recent), 0),
            recent_cached=Coalesce(Sum("cached_tokens", filter=recent), 0),
            total_prompt=Coalesce(Sum("prompt_tokens"), 0),
            total_cached=Coalesce(Sum("cached_tokens"), 0),
        )
    )
    return {
        row["engine"]: CacheHitRate(
            recent_prompt_tokens=row["recent_prompt"],
            recent_cached_tokens=row["recent_cached"],
            total_prompt_tokens=row["total_prompt"],
            total_cached_tokens=row["total_cached"],
        )
        for row in rows
    }
