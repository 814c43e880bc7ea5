"""The engine manager starting the fake engine as a real process: lazy start, health
wait, and start-up errors with the process's log."""

from __future__ import annotations

import psutil
import pytest
from channels.db import database_sync_to_async

from apps.engines.manager import EngineStartError
from apps.engines.models import Engine, EngineInstance, EngineVariant
from apps.engines.services import engine_register_external
from tests.engines.manager_helpers import (
    FAKE_TEMPLATE,
    chat,
    create_managed,
    eventually,
    instance,
    n_ctx,
)

pytestmark = pytest.mark.django_db(transaction=True)

EXITS_AT_ONCE = (
    "{python} -c \"import sys; print('loading model: file is corrupt'); sys.exit(3)\" {port}"
)
NEVER_HEALTHY = (
    "{python} -c \"import time; print('warming up', flush=True); time.sleep(30)\" {port}"
)


async def in_flight(engine: Engine, count: int) -> bool:
    row = await instance(engine)
    return row.in_flight == count


async def test_it_starts_the_engine_on_first_use_and_waits_for_health(manager) -> None:
    engine, (small, _) = await create_managed()
    assert await instance(engine) is None

    async with manager.acquire(engine_id=engine.pk, variant_id=small.pk) as lease:
        assert await n_ctx(lease.base_url) == 1024
        assert await chat(lease.base_url) == 200
        row = await instance(engine)
        assert row.state == EngineInstance.State.RUNNING
        assert (row.variant_id, row.base_url) == (small.pk, lease.base_url)
        assert psutil.Process(row.pid).is_running()
        assert row.port == int(lease.base_url.rsplit(":", 1)[1])
        assert row.owner_pid
        assert row.heartbeat_at
        # In-flight counts are published with the owner's next heartbeat.
        assert await eventually(lambda: in_flight(engine, 1))

    async with manager.acquire(engine_id=engine.pk, variant_id=small.pk) as again:
        assert again.base_url == lease.base_url
    assert manager.launches == 1
    assert await eventually(lambda: in_flight(engine, 0))


async def test_it_passes_slots_and_extra_args_to_the_command(manager) -> None:
    engine, (variant,) = await create_managed(ctx_sizes=(4096,), slots=3)
    variant.extra_args = "--model second-name"
    await database_sync_to_async(variant.save)()

    async with manager.acquire(engine_id=engine.pk, variant_id=variant.pk) as lease:
        from tests.engines.manager_helpers import get_json

        _, props = await get_json(lease.base_url, "/props")
        _, models = await get_json(lease.base_url, "/v1/models")
    assert props["total_slots"] == 3
    assert {m["id"] for m in models["data"]} == {"fake-model", "second-name"}
    row = await instance(engine)
    assert row.command[:2] == [__import__("sys").executable, FAKE_TEMPLATE.split()[1]]


async def test_it_writes_the_engine_output_to_a_log_file(manager, engine_settings) -> None:
    engine, (variant, _) = await create_managed()
    async with manager.acquire(engine_id=engine.pk, variant_id=variant.pk):
        pass

    log = (engine_settings.ENGINE_LOG_DIR / "local-0.log").read_text()
    assert "LISTENING" in log  # the fake engine's own first line
    assert "[gateway" in log
    assert "starting local#0 (fake-model ctx=1024)" in log


async def test_it_reports_an_engine_that_exits_at_once_with_its_log(manager) -> None:
    engine, (variant,) = await create_managed(template=EXITS_AT_ONCE, ctx_sizes=(4096,))

    with pytest.raises(EngineStartError) as caught:
        async with manager.acquire(engine_id=engine.pk, variant_id=variant.pk):
            pass

    message = str(caught.value)
    assert "exited with code 3 during start-up" in message
    assert "loading model: file is corrupt" in message
    assert caught.value.exit_code == 3
    row = await instance(engine)
    assert row.state == EngineInstance.State.FAILED
    assert "file is corrupt" in row.last_error
    assert "file is corrupt" in row.log_tail


async def test_it_gives_up_on_an_engine_that_never_gets_healthy(manager) -> None:
    engine, (variant,) = await create_managed(
        template=NEVER_HEALTHY, ctx_sizes=(4096,), startup_timeout_seconds=1.0
    )

    with pytest.raises(EngineStartError, match=r"did not become healthy .* within 1 s") as caught:
        async with manager.acquire(engine_id=engine.pk, variant_id=variant.pk):
            pass

    assert "warming up" in str(caught.value)
    # The hung process was stopped, not left behind.
    stopped = [e for e in manager.replica(engine_id=engine.pk).events if e[1] == "stopped"]
    assert len(stopped) == 1


async def test_it_retries_a_failed_engine_on_the_next_request(manager) -> None:
    engine, (variant,) = await create_managed(template=EXITS_AT_ONCE, ctx_sizes=(4096,))
    with pytest.raises(EngineStartError):
        async with manager.acquire(engine_id=engine.pk, variant_id=variant.pk):
            pass
    engine.command_template = FAKE_TEMPLATE  # the operator fixes the command
    await database_sync_to_async(engine.save)()

    async with manager.acquire(engine_id=engine.pk, variant_id=variant.pk) as lease:
        assert await chat(lease.base_url) == 200
    assert manager.launches == 2


async def test_it_reports_a_missing_binary(manager) -> None:
    engine, (variant,) = await create_managed(
        template="/nonexistent/llama-server --port {port}", ctx_sizes=(4096,)
    )

    with pytest.raises(EngineStartError, match=r"cannot be started: .*No such file"):
        async with manager.acquire(engine_id=engine.pk, variant_id=variant.pk):
            pass


async def test_it_refuses_a_model_file_that_moved_outside_the_models_dir(
    manager, engine_settings, tmp_path
) -> None:
    model = engine_settings.MODELS_DIR / "model.gguf"
    model.write_bytes(b"GGUF")
    engine, (variant,) = await create_managed(ctx_sizes=(4096,), model_path="model.gguf")
    # Accepted when saved; then someone replaces the file with a link to elsewhere.
    outside = tmp_path / "outside.gguf"
    outside.write_bytes(b"GGUF")
    model.unlink()
    model.symlink_to(outside)

    with pytest.raises(EngineStartError, match="resolves outside the models directory"):
        async with manager.acquire(engine_id=engine.pk, variant_id=variant.pk):
            pass
    assert manager.launches == 0


async def test_it_refuses_a_missing_model_file(manager) -> None:
    engine, (variant,) = await create_managed(ctx_sizes=(4096,), model_path="absent.gguf")

    with pytest.raises(EngineStartError, match="does not exist"):
        async with manager.acquire(engine_id=engine.pk, variant_id=variant.pk):
            pass


async def test_it_refuses_engines_it_does_not_manage(manager) -> None:
    external = await database_sync_to_async(engine_register_external)(
        name="ext", base_url="http://127.0.0.1:9", models=["m"]
    )
    variant = await database_sync_to_async(EngineVariant.objects.get)(engine=external)

    with pytest.raises(EngineStartError, match="not managed"):
        async with manager.acquire(engine_id=external.pk, variant_id=variant.pk):
            pass
    with pytest.raises(EngineStartError, match="does not exist"):
        async with manager.acquire(engine_id=10**9, variant_id=variant.pk):
            pass
    engine, (managed_variant, _) = await create_managed()
    with pytest.raises(EngineStartError, match="no replica 1"):
        async with manager.acquire(engine_id=engine.pk, variant_id=managed_variant.pk, replica=1):
            pass


async def test_it_runs_replicas_as_separate_processes(manager) -> None:
    engine, (variant, _) = await create_managed(replicas=2)

    async with (
        manager.acquire(engine_id=engine.pk, variant_id=variant.pk, replica=0) as first,
        manager.acquire(engine_id=engine.pk, variant_id=variant.pk, replica=1) as second,
    ):
        assert first.base_url != second.base_url
        assert await chat(first.base_url) == await chat(second.base_url) == 200
    assert manager.launches == 2
    assert {s["replica"] for s in manager.status()} == {0, 1}


async def test_it_stops_its_engines_when_shut_down(manager) -> None:
    engine, (variant, _) = await create_managed()
    async with manager.acquire(engine_id=engine.pk, variant_id=variant.pk):
        pid = (await instance(engine)).pid

    await manager.shutdown()

    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    row = await instance(engine)
    assert (row.state, row.pid, row.owner_pid, row.base_url) == ("stopped", None, None, "")
