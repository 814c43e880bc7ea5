"""Where cached answers live: Redis when REDIS_URL is set, else this process's memory.

Redis is shared by every worker and host, so a hit anywhere serves everyone of that
tenant. Without it, each process keeps its own bounded LRU (RESPONSE_CACHE_MAX_ENTRIES):
a hit costs nothing and a miss no write; PostgreSQL was not chosen because every hit would
then cost a round trip and every cached answer a row write (and vacuum), the very work the
cache is there to save. Entries are keyed by tenant id first, so no lookup can ever reach
another tenant's answers.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

from django.conf import settings

PREFIX = "gw:rc:"


@dataclass(frozen=True, slots=True)
class Size:
    entries: int
    bytes: int


class MemoryStore:
    def __init__(self) -> None:
        self._items: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    async def get(self, key: str) -> bytes | None:
        item = self._items.get(key)
        if item is None:
            return None
        if item[0] <= time.monotonic():
            del self._items[key]
            return None
        self._items.move_to_end(key)
        return item[1]

    async def set(self, key: str, value: bytes, ttl: int) -> None:
        self._items[key] = (time.monotonic() + ttl, value)
        self._items.move_to_end(key)
        while len(self._items) > settings.RESPONSE_CACHE_MAX_ENTRIES:
            self._items.popitem(last=False)

    def size(self, tenant_id: int) -> Size:
        """This process's live entries of one tenant (for stats; not on the hot path)."""
        prefix, now = f"{tenant_id}:", time.monotonic()
        values = [v for k, (t, v) in list(self._items.items()) if k.startswith(prefix) and t > now]
        return Size(entries=len(values), bytes=sum(len(v) for v in values))

    def clear(self) -> None:
        self._items.clear()


class RedisStore:
    def __init__(self, url: str) -> None:
        self._url = url
        self._client = None

    def _redis(self):
        if self._client is None:
            import redis.asyncio

            self._client = redis.asyncio.Redis.from_url(self._url)
        return self._client

    async def get(self, key: str) -> bytes | None:
        return await self._redis().get(PREFIX + key)

    async def set(self, key: str, value: bytes, ttl: int) -> None:
        await self._redis().set(PREFIX + key, value, ex=ttl)

    def size(self, tenant_id: int) -> Size:
        """Scans the tenant's keys with a blocking client (stats pages only)."""
        import redis

        client = redis.Redis.from_url(self._url)
        try:
            keys = list(client.scan_iter(match=f"{PREFIX}{tenant_id}:*", count=1000))
            sizes = [client.memory_usage(k) or 0 for k in keys]
        finally:
            client.close()
        return Size(entries=len(keys), bytes=sum(sizes))

    def clear(self) -> None:
        self._client = None


def make_store() -> MemoryStore | RedisStore:
    return RedisStore(settings.REDIS_URL) if settings.REDIS_URL else MemoryStore()


store = make_store()
