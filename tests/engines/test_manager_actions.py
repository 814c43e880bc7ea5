"""Operator actions (start, stop, restart) written on the instance rows and carried out
by the gateway process that owns the replica, or takes it."""

from __future__ import annotations

import psutil
import pytest
from channels.db import database_sync_to_async

from apps.engines.models import EngineInstance
from apps.engines.services import engine_instance_request_action
from tests.engines.manager_helpers import (
    chat,
    create_managed,
    eventually,
    instance,
)

pytestmark = pytest.mark.django_db(transaction=True)

request_action = database_sync_to_async(engine_instance_request_action)


async def row_in(engine, state: str, replica: int = 0) -> EngineInstance | None:
    row = await instance(engine, replica)
    return row if row is not None and row.state == state and not row.requested_action else None


async def test_it_starts_stops_and_restarts_on_request(manager) -> None:
    engine, (small, _) = await create_managed()

    assert await request_action(engine=engine, action="start") == 1
    started = await eventually(lambda: row_in(engine, "running"))
    assert started.variant_id == small.pk  # nothing ran before: the first variant
    assert await chat(started.base_url) == 200

    await request_action(engine=engine, action="restart")
    restarted = await eventually(
        lambda: row_in(engine, "running") if manager.launches == 2 else None
    )
    assert restarted.pid != started.pid
    assert restarted.variant_id == small.pk
    assert not psutil.pid_exists(started.pid) or (
        psutil.Process(started.pid).status() == psutil.STATUS_ZOMBIE
    )

    await request_action(engine=engine, action="stop")
    stopped = await eventually(lambda: row_in(engine, "stopped"))
    assert (stopped.pid, stopped.base_url) == (None, "")


async def test_it_restarts_the_variant_that_was_running(manager) -> None:
    engine, (_, large) = await create_managed()
    async with manager.acquire(engine_id=engine.pk, variant_id=large.pk):
        pass

    await request_action(engine=engine, action="restart")

    row = await eventually(lambda: row_in(engine, "running") if manager.launches == 2 else None)
    assert row.variant_id == large.pk


async def test_it_starts_every_replica_or_just_one(manager) -> None:
    engine, _ = await create_managed(replicas=2)

    await request_action(engine=engine, action="start", replica=1)
    await eventually(lambda: row_in(engine, "running", replica=1))
    assert (await instance(engine, 0)).state == "stopped"

    await request_action(engine=engine, action="start")
    await eventually(lambda: row_in(engine, "running", replica=0))
    assert manager.launches == 2


async def test_it_refuses_unknown_actions_and_external_engines(engine_settings) -> None:
    from apps.engines.services import engine_register_external

    engine = await database_sync_to_async(engine_register_external)(
        name="ext", base_url="http://127.0.0.1:9", models=["m"]
    )
    with pytest.raises(ValueError, match="not managed"):
        await request_action(engine=engine, action="start")
    managed, _ = await create_managed()
    with pytest.raises(ValueError, match="Unknown action"):
        await request_action(engine=managed, action="explode")


async def test_it_kills_an_engine_that_ignores_sigterm_after_the_grace(manager) -> None:
    engine, (small,) = await create_managed(
        ctx_sizes=(1024,), extra_args="--ignore-sigterm", stop_grace_seconds=0.5
    )
    async with manager.acquire(engine_id=engine.pk, variant_id=small.pk):
        pass
    pid = (await instance(engine)).pid

    await request_action(engine=engine, action="stop")

    stopped = await eventually(lambda: row_in(engine, "stopped"))
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert "still running 0.5 s after SIGTERM: SIGKILL" in stopped.log_tail
    assert "stopped (exit code -9)" in stopped.log_tail
