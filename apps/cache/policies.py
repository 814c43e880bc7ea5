"""The cache TTL of a request, from an in-process snapshot of the cache policies (re-read
at most every REGISTRY_CACHE_SECONDS, like the engine registry: no query per request)."""

from __future__ import annotations

import asyncio
import time

from channels.db import database_sync_to_async
from django.conf import settings

from apps.cache.models import CachePolicy

Policies = dict[tuple[int | None, int | None], int]


def load_policies() -> Policies:
    return {
        (p.tenant_id, p.model_id): p.ttl_seconds
        for p in CachePolicy.objects.only("tenant_id", "model_id", "ttl_seconds")
    }


_load_async = database_sync_to_async(load_policies, thread_sensitive=False)


class PolicySnapshot:
    def __init__(self) -> None:
        self._policies: Policies | None = None
        self._loaded_at = 0.0
        self._lock: asyncio.Lock | None = None

    async def ttl(self, *, tenant_id: int, model_id: int) -> int:
        policies = await self._get()
        for key in ((tenant_id, model_id), (tenant_id, None), (None, model_id)):
            if key in policies:
                return policies[key]
        return settings.RESPONSE_CACHE_SECONDS

    async def _get(self) -> Policies:
        fresh = time.monotonic() - self._loaded_at < settings.REGISTRY_CACHE_SECONDS
        if self._policies is not None and fresh:
            return self._policies
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._policies is None or time.monotonic() - self._loaded_at >= max(
                settings.REGISTRY_CACHE_SECONDS, 0
            ):
                self._policies = await _load_async()
                self._loaded_at = time.monotonic()
        return self._policies


policies = PolicySnapshot()
