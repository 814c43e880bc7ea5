"""The gateway's own engine calls on a tenant's behalf (RAG embeddings and reranking, the
safety classifier): through the engine registry (any flavour, external or managed: a
managed engine is started or woken for it), in a scheduler slot on one of the engine's
replicas (so they share its slots fairly with the tenants' chat traffic), with the
process's shared aiohttp client."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
from django.conf import settings

from apps.core.errors import ApiError
from apps.core.usage import UsageCall
from apps.engines.client import engine_session, engine_url, request_timeout
from apps.engines.registry import ModelRoute, VariantRoute, registry
from apps.engines.scheduler import Placement, SchedulerBusy, SlotRequest
from apps.engines.scheduler_service import worker_scheduler
from apps.engines.stage import largest_variant, replica_order, replica_url
from apps.observability import metrics
from apps.observability.metrics import child

TRANSIENT_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
VariantPick = Callable[[ModelRoute], VariantRoute]


class EngineError(Exception):
    """An engine call failed; `transient` ones (overload, restarts, timeouts) may be retried.
    `status`: the engine's HTTP status when it answered with an error, else 0."""

    def __init__(self, message: str, *, transient: bool, status: int = 0) -> None:
        super().__init__(message)
        self.transient = transient
        self.status = status


class ModelNotServed(EngineError):
    """No engine serves the model (unknown name, or no variant)."""


async def variant_of(
    model: str, *, pick: VariantPick = largest_variant
) -> tuple[str, VariantRoute]:
    """The model's own name (`model` may be an alias) and its variant (the largest)."""
    route = (await registry.get()).find(model)
    if route is None or not route.variants:
        raise ModelNotServed(f"The model `{model}` is not served by any engine.", transient=False)
    return route.name, pick(route)


async def engine_post(
    *,
    model: str,
    path: str,
    body: dict[str, Any],
    tenant: str,
    weight: int = 1,
    client: aiohttp.ClientSession | None = None,
    pick: VariantPick = largest_variant,
    call: UsageCall | None = None,
    slot_held_on: str = "",
) -> dict[str, Any]:
    """POST `body` (with the model's own name) to `path` of the model's engine, in a slot
    taken for `tenant` (its fairness share `weight`); `call` learns the engine's name.

    `slot_held_on`: the engine on which the request this call is made for holds a slot
    while it waits for the call (a response's safety check): a call to that engine goes
    without a slot of its own, since queueing behind that request would wait for itself
    (with one slot, for ever); the engine queues it if it must."""
    name, variant = await variant_of(model, pick=pick)
    engine = variant.engine
    if call is not None:
        call.model, call.engine = name, engine.name
    request = SlotRequest(
        engine.name,
        replicas=engine.replicas,
        slots=engine.slots,
        tenant=tenant,
        weight=weight,
        insist=False,
        max_queue=settings.SCHEDULER_MAX_QUEUE,
        max_wait=settings.SCHEDULER_MAX_WAIT_SECONDS,
        replica_order=await replica_order(variant),
    )
    lease = (
        _InHeldSlot(engine.name, request.replica_order)
        if slot_held_on == engine.name
        else worker_scheduler().slot(request)
    )
    headers = {"Content-Type": "application/json"}
    if engine.upstream_api_key:
        headers["Authorization"] = f"Bearer {engine.upstream_api_key}"
    # The engine's queued and in-flight gauges count these calls as they count requests.
    queued = child(metrics.QUEUED, engine.name)
    queued.inc()
    waiting = True
    try:
        async with lease as placement:
            queued.dec()
            waiting = False
            in_flight = child(metrics.IN_FLIGHT, engine.name)
            in_flight.inc()
            try:
                async with (
                    replica_url(variant, placement.replica) as base_url,
                    (client or engine_session()).post(
                        engine_url(base_url, path),
                        data=orjson.dumps({**body, "model": name}),
                        headers=headers,
                        timeout=request_timeout(engine.timeout_seconds),
                    ) as resp,
                ):
                    raw = await resp.read()
                    status = resp.status
            finally:
                in_flight.dec()
    except SchedulerBusy as busy:
        raise EngineError(
            f"Engine `{engine.name}` is busy ({busy.reason}).", transient=True
        ) from busy
    except ApiError as exc:  # a managed engine that cannot start
        raise EngineError(exc.message, transient=True) from None
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise EngineError(
            f"Engine `{engine.name}` is unreachable: {exc!r}", transient=True
        ) from exc
    finally:
        if waiting:
            queued.dec()
    if status != 200:
        detail = raw[:300].decode("utf-8", "replace")
        raise EngineError(
            f"Engine `{engine.name}` answered {status} on {path}: {detail}",
            transient=status in TRANSIENT_STATUSES,
            status=status,
        )
    try:
        answer = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise EngineError(
            f"Engine `{engine.name}` sent no JSON on {path}.", transient=False
        ) from None
    if not isinstance(answer, dict):
        raise EngineError(f"Engine `{engine.name}` sent no JSON object on {path}.", transient=False)
    return answer


class _InHeldSlot:
    """The placement of a call made within its request's slot (see engine_post)."""

    def __init__(self, engine_key: str, order: tuple[int, ...]) -> None:
        replica = order[0] if order else 0
        self.placement = Placement(
            engine_key, replica, slot=0, waited=0.0, sticky=False, granted_at=time.monotonic()
        )

    async def __aenter__(self) -> Placement:
        return self.placement

    async def __aexit__(self, *exc_info: object) -> None:
        return None
