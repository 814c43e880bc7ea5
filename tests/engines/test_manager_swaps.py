"""Swapping the variant a replica runs: drain first, one swap for every waiter, and
neither the old nor the new variant starves."""

from __future__ import annotations

import asyncio
import time

import pytest
from channels.db import database_sync_to_async

from apps.engines.manager import EngineManager, EngineStartError
from apps.engines.models import EngineVariant
from tests.engines.manager_helpers import (
    chat,
    create_managed,
    n_ctx,
)

pytestmark = pytest.mark.django_db(transaction=True)


async def request(
    manager: EngineManager, variant: EngineVariant, *, delay: float = 0.0
) -> dict[str, object]:
    """One request through a lease: when it arrived, was admitted and finished, and what
    context size answered."""
    arrived = time.monotonic()
    async with manager.acquire(engine_id=variant.engine_id, variant_id=variant.pk) as lease:
        admitted = time.monotonic()
        status = await chat(lease.base_url, delay=delay)
        ctx = await n_ctx(lease.base_url)
        done = time.monotonic()
    return {"arrived": arrived, "admitted": admitted, "done": done, "status": status, "ctx": ctx,
            "base_url": lease.base_url}  # fmt: skip


def launches(manager: EngineManager, engine_id: int) -> list[tuple[float, int]]:
    replica = manager.replica(engine_id=engine_id)
    return [(at, variant) for at, kind, variant in replica.events if kind == "launch"]


async def test_it_drains_in_flight_requests_before_swapping(manager) -> None:
    engine, (small, large) = await create_managed()
    await request(manager, small)  # small runs

    slow = asyncio.ensure_future(request(manager, small, delay=1.0))
    await asyncio.sleep(0.2)  # the slow request is in flight
    waiters = await asyncio.gather(*(request(manager, large) for _ in range(3)))
    slow_result = await slow

    assert slow_result["status"] == 200
    assert slow_result["ctx"] == 1024
    (_, first), (large_launched_at, second) = launches(manager, engine.pk)
    assert (first, second) == (small.pk, large.pk)
    assert slow_result["done"] <= large_launched_at  # drained before the new start
    # One swap served every waiter: one start, all of them on it.
    assert manager.launches == 2
    assert {w["ctx"] for w in waiters} == {2048}
    assert len({w["base_url"] for w in waiters}) == 1
    assert all(w["status"] == 200 for w in waiters)


async def test_it_swaps_at_once_when_nothing_is_in_flight(manager) -> None:
    engine, (small, large) = await create_managed()
    await request(manager, small)

    started = time.monotonic()
    result = await request(manager, large)

    assert result["ctx"] == 2048
    assert time.monotonic() - started < 5  # no drain timeout, no grace wait
    (_, _), (swapped_at, _) = launches(manager, engine.pk)
    assert swapped_at - started < 1.0


async def test_it_lets_neither_variant_starve(manager, engine_settings) -> None:
    """A steady stream of small-context requests (a new one every 0.1 s for 4 s, 0.3 s
    each) would never leave an idle gap for a swap. After the grace (0.5 s here), new small
    requests queue behind the swap, the large request is served, then the queue swaps back."""
    engine, (small, large) = await create_managed()
    await request(manager, small)

    async def stream() -> list[dict[str, object]]:
        tasks, end = [], time.monotonic() + 4.0
        while time.monotonic() < end:
            tasks.append(asyncio.ensure_future(request(manager, small, delay=0.3)))
            await asyncio.sleep(0.1)
        return await asyncio.gather(*tasks)

    small_stream = asyncio.ensure_future(stream())
    await asyncio.sleep(0.5)
    asked = time.monotonic()
    large_result = await request(manager, large)
    small_results = await small_stream

    grace = engine_settings.ENGINE_SWAP_GRACE_SECONDS
    assert large_result["ctx"] == 2048
    assert large_result["done"] < small_results[-1]["arrived"]  # served mid-stream
    assert all(r["status"] == 200 and r["ctx"] == 1024 for r in small_results)
    # Small requests that came within the grace were admitted to the old process...
    in_grace = [r for r in small_results if asked < r["arrived"] < asked + grace - 0.1]
    assert in_grace
    assert all(r["admitted"] - r["arrived"] < 0.1 for r in in_grace)
    # ...later ones queued behind the swap and were served after swapping back.
    queued = [r for r in small_results if r["arrived"] > asked + grace + 0.1]
    assert queued
    assert all(r["admitted"] > large_result["admitted"] for r in queued)
    assert [v for _, v in launches(manager, engine.pk)] == [small.pk, large.pk, small.pk]


async def test_it_fails_every_waiter_of_a_failed_swap_with_one_attempt(manager) -> None:
    engine, (small, _) = await create_managed()
    await database_sync_to_async(_add_broken_variant)(engine)
    broken = await database_sync_to_async(EngineVariant.objects.get)(engine=engine, ctx_size=4096)
    await request(manager, small)

    results = await asyncio.gather(
        *(request(manager, broken) for _ in range(3)), return_exceptions=True
    )

    assert all(isinstance(r, EngineStartError) for r in results)
    assert "exited with code 2" in str(results[0])
    assert "unrecognized arguments: --no-such-flag" in str(results[0])
    assert manager.launches == 2  # small, then one attempt for all three
    # The replica recovers for the next request.
    assert (await request(manager, small))["ctx"] == 1024


def _add_broken_variant(engine) -> None:
    from apps.engines.services import engine_register_managed

    engine_register_managed(
        name=engine.name,
        command_template=engine.command_template,
        models=["fake-model"],
        ctx_size=4096,
        extra_args="--no-such-flag",
    )
