"""Managed engines' starts, swaps, crashes and load time in the Prometheus metrics."""

from __future__ import annotations

import os
import signal

import pytest
from prometheus_client import REGISTRY

from tests.engines.manager_helpers import create_managed, eventually, instance

pytestmark = pytest.mark.django_db(transaction=True)


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def use(manager, engine, variant) -> None:
    async with manager.acquire(engine_id=engine.pk, variant_id=variant.pk):
        pass


async def test_it_counts_starts_swaps_crashes_and_load_time(manager) -> None:
    engine, (small, large) = await create_managed(name="metered")
    name = {"engine": "metered"}
    await use(manager, engine, small)
    assert value("gateway_engine_starts_total", **name) == 1
    assert value("gateway_engine_load_duration_seconds_count", **name) == 1
    assert value("gateway_engine_load_duration_seconds_sum", **name) > 0
    await use(manager, engine, large)  # another variant: a swap
    assert value("gateway_engine_swaps_total", **name, reason="request") == 2
    assert value("gateway_engine_starts_total", **name) == 2

    os.kill((await instance(engine)).pid, signal.SIGKILL)

    async def crashed() -> bool:
        return value("gateway_engine_crashes_total", **name) == 1

    assert await eventually(crashed)
