"""Crash restarts, crash loops, and idle stops of managed engines."""

from __future__ import annotations

import os
import signal

import psutil
import pytest

from apps.engines.manager import EngineManager
from tests.engines.manager_helpers import (
    chat,
    create_managed,
    eventually,
    instance,
)

pytestmark = pytest.mark.django_db(transaction=True)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def use(manager: EngineManager, engine, variant) -> str:
    async with manager.acquire(engine_id=engine.pk, variant_id=variant.pk) as lease:
        assert await chat(lease.base_url) == 200
    return lease.base_url


def crashes(manager: EngineManager, engine) -> int:
    return sum(1 for e in manager.replica(engine_id=engine.pk).events if e[1] == "crash")


async def running_pid(engine) -> int | None:
    row = await instance(engine)
    return row.pid if row.state == "running" else None


async def running_pid_other_than(engine, pid: int) -> int | None:
    running = await running_pid(engine)
    return running if running != pid else None


async def test_it_restarts_an_engine_that_crashed(manager) -> None:
    engine, (variant, _) = await create_managed()
    await use(manager, engine, variant)
    first_pid = (await instance(engine)).pid

    os.kill(first_pid, signal.SIGKILL)
    await eventually(lambda: crashes(manager, engine) == 1)
    await use(manager, engine, variant)

    second_pid = await eventually(lambda: running_pid(engine))
    assert second_pid != first_pid
    assert manager.launches == 2
    row = await instance(engine)
    assert "exited unexpectedly with code -9" in row.last_error
    assert row.variant_id == variant.pk


async def test_it_restarts_without_waiting_for_a_request(manager) -> None:
    engine, (variant, _) = await create_managed()
    await use(manager, engine, variant)
    first_pid = (await instance(engine)).pid

    os.kill(first_pid, signal.SIGKILL)

    # The row says "running" with the old pid until the crash is noticed: wait for another.
    second_pid = await eventually(lambda: running_pid_other_than(engine, first_pid))
    assert not gone(second_pid)
    assert manager.launches == 2


async def test_it_marks_a_crash_loop_failed_until_the_next_request(
    manager, engine_settings
) -> None:
    engine_settings.ENGINE_CRASH_LOOP_LIMIT = 1
    engine, (variant, _) = await create_managed()
    await use(manager, engine, variant)

    first = (await instance(engine)).pid
    os.kill(first, signal.SIGKILL)
    second = await eventually(lambda: running_pid_other_than(engine, first))
    os.kill(second, signal.SIGKILL)

    row = await eventually(lambda: failed_row(engine))
    assert "crashed 2 times within 60 s" in row.last_error
    assert "exited unexpectedly with code -9" in row.last_error
    assert manager.launches == 2
    # The next request tries again.
    await use(manager, engine, variant)
    assert manager.launches == 3


async def failed_row(engine):
    row = await instance(engine)
    return row if row.state == "failed" else None


async def test_it_stops_an_idle_engine_and_starts_it_again_when_needed(manager) -> None:
    engine, (variant, _) = await create_managed(idle_ttl_seconds=1)
    await use(manager, engine, variant)
    pid = (await instance(engine)).pid

    row = await eventually(lambda: stopped_row(engine), within=5)

    assert gone(pid)
    assert row.owner_pid is None  # nothing runs: ownership is given up too
    assert manager.replica(engine_id=engine.pk) is None
    await use(manager, engine, variant)
    assert manager.launches == 2


async def stopped_row(engine):
    row = await instance(engine)
    return row if row.state == "stopped" and row.owner_pid is None else None


async def test_it_keeps_a_busy_engine_past_its_idle_ttl(manager) -> None:
    engine, (variant, _) = await create_managed(idle_ttl_seconds=1)
    async with manager.acquire(engine_id=engine.pk, variant_id=variant.pk) as lease:
        assert await chat(lease.base_url, delay=1.6) == 200
        assert (await instance(engine)).state == "running"
