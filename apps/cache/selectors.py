"""Response cache statistics: hits, misses and saved tokens from the request logs (every
process's, so they hold across workers), entries and bytes from the store."""

from __future__ import annotations

from dataclasses import dataclass

from django.db.models import Count, Q, Sum
from django.db.models.functions import Coalesce

from apps.cache.store import store
from apps.request_logs.models import RequestLog


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    bypassed: int
    saved_tokens: int
    entries: int
    bytes: int

    @property
    def hit_rate(self) -> float | None:
        looked_up = self.hits + self.misses
        return self.hits / looked_up if looked_up else None


def cache_stats(*, tenant_id: int) -> CacheStats:
    counts = RequestLog.objects.filter(tenant_id=tenant_id).aggregate(
        hits=Count("id", filter=Q(cache_status="hit")),
        misses=Count("id", filter=Q(cache_status="miss")),
        bypassed=Count("id", filter=Q(cache_status="bypass")),
        saved=Coalesce(Sum("cache_saved_tokens", filter=Q(cache_status="hit")), 0),
    )
    size = store.size(tenant_id)
    return CacheStats(
        hits=counts["hits"],
        misses=counts["misses"],
        bypassed=counts["bypassed"],
        saved_tokens=counts["saved"],
        entries=size.entries,
        bytes=size.bytes,
    )
