"""The per-process aiohttp client towards engines (one keep-alive pool per worker)."""

from __future__ import annotations

import functools

import aiohttp
import yarl
from django.conf import settings

_session: aiohttp.ClientSession | None = None


def engine_session() -> aiohttp.ClientSession:
    """The worker's shared ClientSession, created on first use inside the running loop."""
    global _session
    if _session is None or _session.closed:
        connector = aiohttp.TCPConnector(
            limit=settings.ENGINE_POOL_SIZE, limit_per_host=0, ttl_dns_cache=300
        )
        _session = aiohttp.ClientSession(
            connector=connector,
            # Never keep an engine's cookies: the session is shared by every tenant.
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=None),
            auto_decompress=True,
            skip_auto_headers=("User-Agent",),
        )
    return _session


async def close_engine_session() -> None:
    global _session
    if _session is not None and not _session.closed:
        await _session.close()
    _session = None


@functools.cache
def engine_url(base_url: str, path: str) -> yarl.URL:
    """The parsed URL of an engine endpoint (parsed once, not per request)."""
    return yarl.URL(base_url + path)


@functools.cache
def request_timeout(read_seconds: float) -> aiohttp.ClientTimeout:
    """No overall limit (generations are long); bounded connect and gap between bytes."""
    return aiohttp.ClientTimeout(
        total=None,
        sock_connect=settings.ENGINE_CONNECT_TIMEOUT_SECONDS,
        sock_read=read_seconds,
    )
