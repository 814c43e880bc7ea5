"""What the engine manager reads from settings and the database: its timings, a managed
engine's launch settings (an EngineRoute, the same snapshot the /v1 path routes by) and
its variants. Never on the hot path: a replica reads them when it launches or is claimed.
"""

from __future__ import annotations

from dataclasses import dataclass

from channels.db import database_sync_to_async
from django.conf import settings

from apps.engines.engine_process import EngineStartError
from apps.engines.models import Engine, EngineInstance, EngineVariant
from apps.engines.registry import EngineRoute

FOLLOWER_POLL_MAX = 0.25  # a waiting non-owner re-reads the row at least this often


def swap_grace() -> float:
    return settings.ENGINE_SWAP_GRACE_SECONDS


def drain_timeout() -> float:
    return settings.ENGINE_DRAIN_TIMEOUT_SECONDS


def poll_interval() -> float:
    return settings.ENGINE_OWNER_POLL_SECONDS


def owner_stale_after() -> float:
    return settings.ENGINE_OWNER_STALE_SECONDS


@dataclass(frozen=True)
class VariantConfig:
    id: int
    label: str
    ctx_size: int | None
    model_path: str
    extra_args: str


def managed_engine(engine_id: int, replica: int) -> Engine:
    engine = Engine.objects.filter(pk=engine_id).first()
    if engine is None:
        raise EngineStartError(f"Engine {engine_id} does not exist.")
    if not engine.is_managed:
        raise EngineStartError(f"Engine {engine.name} is not managed by the gateway.")
    if not 0 <= replica < engine.replicas:
        raise EngineStartError(f"Engine {engine.name} has no replica {replica}.")
    return engine


@database_sync_to_async
def engine_row(engine_id: int, replica: int) -> tuple[EngineRoute, int, int | None]:
    """The engine's launch settings and its instance row (created on first use)."""
    engine = managed_engine(engine_id, replica)
    row, _ = EngineInstance.objects.get_or_create(engine=engine, replica=replica)
    return EngineRoute.of(engine), row.pk, row.variant_id


@database_sync_to_async
def variant_config(engine_id: int, variant_id: int) -> tuple[EngineRoute, VariantConfig]:
    variant = (
        EngineVariant.objects.select_related("engine", "model")
        .filter(pk=variant_id, engine_id=engine_id)
        .first()
    )
    if variant is None:
        raise EngineStartError(f"Engine {engine_id} has no variant {variant_id}.")
    config = VariantConfig(
        id=variant.pk,
        label=variant.label,
        ctx_size=variant.ctx_size,
        model_path=variant.model_path,
        extra_args=variant.extra_args,
    )
    return EngineRoute.of(variant.engine), config


@database_sync_to_async
def first_variant_id(engine_id: int) -> int | None:
    return (
        EngineVariant.objects.filter(engine_id=engine_id)
        .order_by("pk")
        .values_list("pk", flat=True)
        .first()
    )
