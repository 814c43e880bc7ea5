"""Several gateway processes and one managed engine: exactly one process owns (launches)
it, the others route to it and ask it for other variants; an owner's death is survived.

The other processes are tests/engines/manager_worker.py; the test process is a gateway
process too, with its own EngineManager.
"""

from __future__ import annotations

import asyncio
import os
import signal

import psutil
import pytest

from tests.engines.manager_helpers import (
    FAKE_ENGINE,
    Worker,
    create_managed,
    eventually,
    instance,
    managed_engine,
    n_ctx,
)

pytestmark = pytest.mark.django_db(transaction=True)


def fake_engines_on(port: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if str(FAKE_ENGINE) in cmdline and str(port) in cmdline:
            found.append(proc)
    return found


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_it_lets_one_of_two_processes_launch_and_both_use_it(engine_settings, tmp_path) -> None:
    engine, (variant, _) = managed_engine()
    go, stop = tmp_path / "go", tmp_path / "stop"
    workers = [
        Worker(engine_id=engine.pk, variant_id=variant.pk, log_dir=tmp_path, go=go, stop=stop)
        for _ in range(2)
    ]
    try:
        for worker in workers:
            assert "ready" in worker.message()
        go.touch()  # both acquire at the same moment
        first, second = (worker.message() for worker in workers)

        assert sorted([first["launched"], second["launched"]]) == [0, 1]
        assert first["base_url"] == second["base_url"]
        assert first["status"] == second["status"] == 200
        port = int(first["base_url"].rsplit(":", 1)[1])
        assert len(fake_engines_on(port)) == 1
        from apps.engines.models import EngineInstance

        row = EngineInstance.objects.get(engine=engine)
        owner = next(w for w, m in zip(workers, (first, second), strict=True) if m["launched"])
        assert row.owner_pid == owner.pid
    finally:
        for worker in workers:
            worker.finish()


async def test_it_asks_the_owner_for_another_variant(manager, tmp_path) -> None:
    engine, (small, large) = await create_managed()
    owner = Worker(
        engine_id=engine.pk, variant_id=small.pk, log_dir=tmp_path, stop=tmp_path / "stop", go=None
    )
    try:
        await asyncio.to_thread(owner.message)  # ready
        assert (await asyncio.to_thread(owner.message))["n_ctx"] == 1024

        async with manager.acquire(engine_id=engine.pk, variant_id=large.pk) as lease:
            assert await n_ctx(lease.base_url) == 2048
            row = await instance(engine)
            assert row.owner_pid == owner.pid
            assert row.remote_in_flight == 1
        assert manager.launches == 0  # the owner swapped; this process launched nothing
        await eventually(lambda: remote_in_flight(engine, 0))
    finally:
        await asyncio.to_thread(owner.finish)


async def remote_in_flight(engine, count: int) -> bool:
    return (await instance(engine)).remote_in_flight == count


async def test_it_takes_over_from_a_dead_owner_and_kills_its_engine(
    manager, engine_settings, tmp_path
) -> None:
    engine_settings.ENGINE_OWNER_STALE_SECONDS = 1.0
    engine, (small, _) = await create_managed()
    owner = Worker(
        engine_id=engine.pk, variant_id=small.pk, log_dir=tmp_path, stop=tmp_path / "stop", go=None
    )
    await asyncio.to_thread(owner.message)
    await asyncio.to_thread(owner.message)
    orphan = (await instance(engine)).pid

    os.kill(owner.pid, signal.SIGKILL)  # no clean-up: its engine keeps running
    await asyncio.to_thread(owner.process.wait)
    assert alive(orphan)
    # Until the owner's heartbeat is stale its engine is still used; then it is replaced.
    await asyncio.sleep(engine_settings.ENGINE_OWNER_STALE_SECONDS + 0.2)

    async with manager.acquire(engine_id=engine.pk, variant_id=small.pk) as lease:
        assert await n_ctx(lease.base_url) == 1024
    assert not alive(orphan)
    assert manager.launches == 1
    row = await instance(engine)
    assert row.pid != orphan
    assert row.owner_pid == os.getpid()


async def test_it_cleans_up_after_a_dead_owner_without_any_request(
    manager, engine_settings, tmp_path
) -> None:
    engine_settings.ENGINE_OWNER_STALE_SECONDS = 1.0
    engine, (small, _) = await create_managed()
    owner = Worker(
        engine_id=engine.pk, variant_id=small.pk, log_dir=tmp_path, stop=tmp_path / "stop", go=None
    )
    await asyncio.to_thread(owner.message)
    await asyncio.to_thread(owner.message)
    orphan = (await instance(engine)).pid

    os.kill(owner.pid, signal.SIGKILL)
    await asyncio.to_thread(owner.process.wait)

    await eventually(lambda: not alive(orphan), within=10)
    row = await eventually(lambda: stopped_unowned(engine))
    assert row.pid is None
    assert manager.launches == 0


async def stopped_unowned(engine):
    row = await instance(engine)
    return row if row.state == "stopped" and row.owner_pid is None else None
