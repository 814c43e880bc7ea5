"""An in-process snapshot of engines and served models, for the /v1 hot path.

Re-read from the database at most every REGISTRY_CACHE_SECONDS, by one coroutine at a time;
the others keep using the previous snapshot meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from channels.db import database_sync_to_async
from django.conf import settings

from apps.engines.models import Engine, EngineVariant


@dataclass(frozen=True, slots=True)
class EngineRoute:
    """An engine's settings as one process read them: what the /v1 path routes by, and
    what the engine manager launches a managed engine with (the one snapshot of both)."""

    name: str
    flavor: str
    base_url: str
    upstream_api_key: str
    timeout_seconds: float
    id: int = 0
    managed: bool = False
    slots: int = 1
    replicas: int = 1  # managed: processes; external: base URLs
    base_urls: tuple[str, ...] = ()  # external replicas' roots, replica 0 first
    command_template: str = ""
    startup_timeout_seconds: float = 120.0
    stop_grace_seconds: float = 10.0

    @classmethod
    def of(cls, engine: Engine) -> EngineRoute:
        return cls(
            name=engine.name,
            flavor=engine.flavor,
            base_url=engine.base_url,
            upstream_api_key=engine.upstream_api_key,
            timeout_seconds=engine.timeout_seconds,
            id=engine.pk,
            managed=engine.is_managed,
            slots=engine.slots,
            replicas=engine.replica_count,
            base_urls=tuple(engine.base_urls),
            command_template=engine.command_template,
            startup_timeout_seconds=engine.startup_timeout_seconds,
            stop_grace_seconds=engine.stop_grace_seconds,
        )

    def acquire_timeout(self) -> float:
        """How long a request may wait for this managed engine: a drain plus a start, and
        some (ENGINE_ACQUIRE_TIMEOUT_SECONDS if set)."""
        configured = settings.ENGINE_ACQUIRE_TIMEOUT_SECONDS
        if configured is not None:
            return float(configured)
        return settings.ENGINE_DRAIN_TIMEOUT_SECONDS + self.startup_timeout_seconds + 30.0


@dataclass(frozen=True, slots=True)
class VariantRoute:
    engine: EngineRoute
    ctx_size: int | None
    system_prompt: str = ""
    id: int = 0
    # Every variant of the same model (this one included): processes running any of them
    # share its tokenizer, so any of them can size a request for it.
    model_variant_ids: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class ModelRoute:
    id: int
    name: str
    created: int  # unix seconds, for /v1/models
    variants: tuple[VariantRoute, ...]
    fallbacks: tuple[str, ...] = ()  # model names to try, in order, when this one is down

    @property
    def owned_by(self) -> str:
        return self.variants[0].engine.name if self.variants else "gateway"


@dataclass(frozen=True)
class Snapshot:
    models: dict[str, ModelRoute] = field(default_factory=dict)
    engines: tuple[EngineRoute, ...] = ()
    # Every name a client may use: model names, their aliases, and tiers (light/medium/heavy).
    names: dict[str, ModelRoute] = field(default_factory=dict)

    def find(self, name: str) -> ModelRoute | None:
        return self.names.get(name)


def _names(
    models: dict[str, ModelRoute], extra: dict[str, tuple[list[str], str]]
) -> dict[str, ModelRoute]:
    """Model names win over aliases, aliases over tiers; a tier goes to the first model by name."""
    names: dict[str, ModelRoute] = {}
    for name in sorted(models):
        tier = extra[name][1]
        if tier:
            names.setdefault(tier, models[name])
    for name in sorted(models):
        for alias in extra[name][0]:
            names[alias] = models[name]
    names.update(models)
    return names


def load_snapshot() -> Snapshot:
    engines = {engine.pk: EngineRoute.of(engine) for engine in Engine.objects.all()}
    grouped: dict[int, list[EngineVariant]] = {}
    names: dict[int, tuple[str, int]] = {}
    fallbacks: dict[int, tuple[str, ...]] = {}
    extra: dict[str, tuple[list[str], str]] = {}
    for variant in EngineVariant.objects.select_related("model").order_by("model_id", "ctx_size"):
        grouped.setdefault(variant.model_id, []).append(variant)
        names[variant.model_id] = (variant.model.name, int(variant.model.created_at.timestamp()))
        extra[variant.model.name] = (variant.model.aliases, variant.model.tier)
        fallbacks[variant.model_id] = tuple(variant.model.fallbacks)
    models = {}
    for model_id, variants in grouped.items():
        name, created = names[model_id]
        ids = tuple(v.pk for v in variants)
        routes = tuple(
            VariantRoute(engines[v.engine_id], v.ctx_size, v.system_prompt, v.pk, ids)
            for v in variants
        )
        models[name] = ModelRoute(
            id=model_id,
            name=name,
            created=created,
            variants=routes,
            fallbacks=fallbacks[model_id],
        )
    return Snapshot(models=models, engines=tuple(engines.values()), names=_names(models, extra))


_load_snapshot_async = database_sync_to_async(load_snapshot, thread_sensitive=False)


class Registry:
    def __init__(self) -> None:
        self._snapshot: Snapshot | None = None
        self._loaded_at = 0.0
        self._lock: asyncio.Lock | None = None

    async def get(self) -> Snapshot:
        if self._snapshot is not None and not self._stale():
            return self._snapshot
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # one reload at a time; the others wait for its result
            if self._snapshot is None or self._stale():
                self._snapshot = await _load_snapshot_async()
                self._loaded_at = time.monotonic()
        return self._snapshot

    def _stale(self) -> bool:
        return time.monotonic() - self._loaded_at >= settings.REGISTRY_CACHE_SECONDS


registry = Registry()
