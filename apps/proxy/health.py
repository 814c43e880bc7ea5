"""GET /health (no key): is the database reachable, and is each engine?"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
from channels.db import database_sync_to_async
from django.conf import settings
from django.db import connection

from apps.engines.client import engine_session
from apps.engines.registry import EngineRoute, registry
from apps.proxy.consumers import V1Consumer

# llama.cpp and vLLM answer GET /health; other OpenAI-compatible servers list their models.
_PROBE_PATHS = {"llamacpp": "/health", "vllm": "/health"}


def _ping_database() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


async def _database_status() -> dict[str, Any]:
    try:
        await database_sync_to_async(_ping_database, thread_sensitive=False)()
    except Exception as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"ok": True}


async def _engine_status(engine: EngineRoute) -> dict[str, Any]:
    url = engine.base_url + _PROBE_PATHS.get(engine.flavor, "/v1/models")
    status: dict[str, Any] = {"name": engine.name, "url": url}
    started = time.perf_counter()
    headers = (
        {"Authorization": f"Bearer {engine.upstream_api_key}"} if engine.upstream_api_key else {}
    )
    try:
        timeout = aiohttp.ClientTimeout(total=settings.HEALTH_PROBE_TIMEOUT_SECONDS)
        async with engine_session().get(url, headers=headers, timeout=timeout) as resp:
            await resp.read()
            status.update(ok=resp.status == 200, status_code=resp.status)
    except (TimeoutError, aiohttp.ClientError) as exc:
        status.update(ok=False, error=f"{type(exc).__name__}: {exc}".strip(": "))
    status["latency_ms"] = round((time.perf_counter() - started) * 1000, 1)
    return status


class HealthConsumer(V1Consumer):
    methods = ("GET",)

    async def handle(self, body: bytes) -> None:
        database = await _database_status()
        engines: list[dict[str, Any]] = []
        if database["ok"]:
            snapshot = await registry.get()
            engines = list(await asyncio.gather(*(_engine_status(e) for e in snapshot.engines)))
        healthy = database["ok"] and all(engine["ok"] for engine in engines)
        payload = {
            "status": "ok" if healthy else ("degraded" if database["ok"] else "down"),
            "database": database,
            "engines": engines,
        }
        await self.send_json(200 if database["ok"] else 503, payload)
