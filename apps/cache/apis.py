"""GET /api/cache/stats: the calling tenant's response cache figures (thin view)."""

from __future__ import annotations

from rest_framework.request import Request
from rest_framework.response import Response

from apps.cache.selectors import cache_stats
from apps.cache.store import RedisStore, store
from apps.tenants.api_auth import TenantApiView


class CacheStatsApi(TenantApiView):
    """Hits, misses and bypasses of the caller's tenant, the tokens hits saved, and its
    entries in the store (with local memory: those of the process that answers)."""

    def get(self, request: Request) -> Response:
        stats = cache_stats(tenant_id=self.principal.tenant.pk)
        return Response(
            {
                "object": "cache.stats",
                "tenant": self.principal.tenant.slug,
                "store": "redis" if isinstance(store, RedisStore) else "memory",
                "hits": stats.hits,
                "misses": stats.misses,
                "bypassed": stats.bypassed,
                "hit_rate": stats.hit_rate,
                "saved_tokens": stats.saved_tokens,
                "entries": stats.entries,
                "bytes": stats.bytes,
            }
        )
