"""The engine manager's own database connection holds the advisory locks that make this
process a replica's owner: a lock must never be lost while the manager believes it owns
the replica (two processes would then run the same replica's engine)."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from apps.core.db import connection_kwargs
from apps.engines.instance_store import ControlConnection, lock_key
from apps.engines.manager import EngineManager
from tests.engines.manager_helpers import create_managed, eventually, instance
from tests.engines.test_manager_recovery import gone, use

pytestmark = pytest.mark.django_db(transaction=True)


async def lock_is_free(key: int) -> bool:
    """Whether another connection could take the lock now (and gives it back at once)."""
    async with await psycopg.AsyncConnection.connect(**connection_kwargs()) as other:
        got = await (await other.execute("SELECT pg_try_advisory_lock(%s)", (key,))).fetchone()
        if got[0]:
            await other.execute("SELECT pg_advisory_unlock(%s)", (key,))
        return got[0]


async def test_it_keeps_a_lock_taken_while_other_callers_open_the_connection() -> None:
    control = ControlConnection()
    key = lock_key(engine_id=999_001, replica=0)
    try:
        # The first statements of a fresh connection race to open it (the tick's ping
        # and a request's admission, say): the lock must be on the connection that every
        # later statement uses, or its unlock (and its loss) would go unnoticed.
        got, *_ = await asyncio.gather(control.try_lock(key), control.ping(), control.ping())
        assert got
        assert control.epoch == 1  # one connection opened
        assert not await lock_is_free(key)
        await control.unlock(key)
        assert await lock_is_free(key)
    finally:
        await control.close()


async def drop_connection(manager: EngineManager) -> None:
    """PostgreSQL ends the manager's connection (a database restart, a network blip)."""
    (backend,) = await manager.control.one("SELECT pg_backend_pid()")
    async with await psycopg.AsyncConnection.connect(**connection_kwargs()) as admin:
        await admin.execute("SELECT pg_terminate_backend(%s)", (backend,))


async def drop_connection_and_reconnect(manager: EngineManager, engine_settings) -> None:
    """The manager's connection drops and a request's statement reconnects before the
    owner's tick notices: the new connection holds no lock."""
    engine_settings.ENGINE_OWNER_POLL_SECONDS = 1.0
    await asyncio.sleep(0.3)  # the tick is now in its longer sleep
    await drop_connection(manager)
    with pytest.raises(psycopg.OperationalError):
        await manager.control.ping()
    await manager.control.ping()  # reconnected
    engine_settings.ENGINE_OWNER_POLL_SECONDS = 0.1


async def running_engine(manager: EngineManager) -> tuple[object, object, int, int]:
    engine, (variant, _) = await create_managed()
    await use(manager, engine, variant)
    key = lock_key(engine_id=engine.pk, replica=0)
    assert not await lock_is_free(key)
    return engine, variant, key, (await instance(engine)).pid


async def test_it_takes_its_lock_back_after_a_reconnect_if_nobody_took_it(
    manager: EngineManager, engine_settings
) -> None:
    engine, variant, key, pid = await running_engine(manager)
    await drop_connection_and_reconnect(manager, engine_settings)
    assert await lock_is_free(key)

    await eventually(lambda: not_free(key), within=5)
    await use(manager, engine, variant)
    assert (await instance(engine)).pid == pid  # the engine kept running, nothing relaunched
    assert manager.launches == 1


async def not_free(key: int) -> bool:
    return not await lock_is_free(key)


@pytest.mark.parametrize("other_dies_at_once", [False, True])
async def test_it_stops_its_engine_when_another_process_took_the_lock_meanwhile(
    manager: EngineManager, engine_settings, other_dies_at_once: bool
) -> None:
    engine, variant, key, pid = await running_engine(manager)
    await drop_connection_and_reconnect(manager, engine_settings)
    other = ControlConnection()  # another gateway process claims the replica
    try:
        assert await other.try_lock(key)
        await other.claim((await instance(engine)).pk, owner_pid=1, owner_host="elsewhere")
        if other_dies_at_once:  # before our tick: the lock is free, the row is not ours
            await other.close()

        await eventually(lambda: gone(pid), within=5)
        assert manager.replica(engine_id=engine.pk) is None
    finally:
        await other.close()  # and dies: the lock is free again
    await use(manager, engine, variant)
    assert (await instance(engine)).pid != pid
    assert not await lock_is_free(key)


async def test_it_stops_its_engine_and_frees_the_row_when_its_tick_finds_the_connection_lost(
    manager: EngineManager,
) -> None:
    engine, variant, key, pid = await running_engine(manager)
    await drop_connection(manager)

    await eventually(lambda: gone(pid), within=5)  # the tick's ping failed
    # Once reconnected, the row no longer sends anyone to the stopped engine.
    await eventually(lambda: row_is_free(engine), within=5)
    assert await lock_is_free(key)
    await use(manager, engine, variant)
    assert (await instance(engine)).pid != pid
    assert manager.launches == 2


async def row_is_free(engine) -> bool:
    row = await instance(engine)
    return row.state == "stopped" and row.base_url == "" and row.owner_pid is None
