"""GET/HEAD /health (no key): is the database reachable, and is each engine replica?

External engines: every replica (each base URL) is probed. Managed engines have no URL of
their own: each replica is reported from its EngineInstance row, read as the admin reads it
(a state whose owner stopped heartbeating is not believed). A running replica is probed at
the URL its owner published; a stopped one is fine (the next request starts it), so is one
starting; a failed one is not, with its last error.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
from channels.db import database_sync_to_async
from django.conf import settings
from django.db import connection
from django.db.models import Prefetch

from apps.engines.client import engine_session
from apps.engines.models import Engine, EngineInstance
from apps.engines.registry import EngineRoute, registry
from apps.engines.selectors import InstanceStatus, engine_instance_statuses
from apps.proxy.consumers import JSON_HEADERS, V1Consumer

# llama.cpp and vLLM answer GET /health; other OpenAI-compatible servers list their models.
_PROBE_PATHS = {"llamacpp": "/health", "vllm": "/health"}
_PROBED_STATES = (EngineInstance.State.RUNNING, EngineInstance.State.DRAINING)

Status = dict[str, Any]


def _ping_database() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


async def _database_status() -> Status:
    try:
        await database_sync_to_async(_ping_database, thread_sensitive=False)()
    except Exception as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"ok": True}


async def _probe(engine: EngineRoute, base_url: str) -> Status:
    """GET the engine's health path under `base_url`: ok when it answers 200."""
    url = base_url + _PROBE_PATHS.get(engine.flavor, "/v1/models")
    status: Status = {"url": url}
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


async def _external_replicas(engine: EngineRoute) -> list[Status]:
    urls = engine.base_urls or (engine.base_url,)
    probes = await asyncio.gather(*(_probe(engine, url) for url in urls))
    return [{"replica": index, **probe} for index, probe in enumerate(probes)]


async def _managed_replica(engine: EngineRoute, instance: InstanceStatus) -> Status:
    status: Status = {"replica": instance.replica, "state": instance.state}
    if instance.state == EngineInstance.State.FAILED:
        return {**status, "ok": False, "error": instance.last_error or "failed"}
    if instance.state not in _PROBED_STATES:
        return {**status, "ok": True}  # stopped: started on the next request; or starting
    if not instance.base_url:
        return {**status, "ok": False, "error": "its owner published no URL"}
    return {**status, **await _probe(engine, instance.base_url)}


def _instances_of(engine_ids: list[int]) -> dict[int, list[InstanceStatus]]:
    """Each managed engine's replicas, by engine id (two queries for all of them)."""
    rows = EngineInstance.objects.select_related("variant__model", "requested_variant__model")
    engines = Engine.objects.filter(pk__in=engine_ids).prefetch_related(
        Prefetch("instances", queryset=rows)
    )
    return {
        engine.pk: engine_instance_statuses(engine=engine, rows=list(engine.instances.all()))
        for engine in engines
    }


_instances_of_async = database_sync_to_async(_instances_of, thread_sensitive=False)


async def _engine_status(engine: EngineRoute, instances: list[InstanceStatus]) -> Status:
    if engine.managed:
        replicas = list(await asyncio.gather(*(_managed_replica(engine, i) for i in instances)))
    else:
        replicas = await _external_replicas(engine)
    return {
        "name": engine.name,
        "kind": "managed" if engine.managed else "external",
        "ok": all(replica["ok"] for replica in replicas),
        "replicas": replicas,
    }


async def _engines_status() -> list[Status]:
    engines = (await registry.get()).engines
    managed_ids = [engine.id for engine in engines if engine.managed]
    instances = await _instances_of_async(managed_ids) if managed_ids else {}
    return list(
        await asyncio.gather(*(_engine_status(e, instances.get(e.id, [])) for e in engines))
    )


class HealthConsumer(V1Consumer):
    methods = ("GET", "HEAD")

    async def handle(self, body: bytes) -> None:
        database = await _database_status()
        engines = await _engines_status() if database["ok"] else []
        healthy = database["ok"] and all(engine["ok"] for engine in engines)
        payload = {
            "status": "ok" if healthy else ("degraded" if database["ok"] else "down"),
            "database": database,
            "engines": engines,
        }
        status = 200 if database["ok"] else 503
        if self.scope["method"] == "HEAD":  # the same answer, without its body
            await self.send_response(status, b"", headers=JSON_HEADERS)
            return
        await self.send_json(status, payload)
