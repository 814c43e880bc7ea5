"""One scheduler for every worker of a host: slots, fairness and sticky slots hold across
worker processes, a worker that dies gives back what it held, and an unreachable service
means scheduling locally rather than refusing requests."""

from __future__ import annotations

import asyncio
import itertools
import secrets
import threading
from collections.abc import AsyncIterator

import httpx
import pytest

from apps.engines.models import Engine
from apps.engines.scheduler import Scheduler, SchedulerBusy, SlotRequest
from apps.engines.scheduler_service import RemoteScheduler, SchedulerService
from tests.conftest import FAKE_MODEL, start_gateway

OPTIONS = {"replicas": 1, "slots": 1, "max_queue": 100, "max_wait": 10.0}


def request(tenant: str, **options: object) -> SlotRequest:
    return SlotRequest("e", tenant=tenant, **{**OPTIONS, **options})


@pytest.fixture
async def service() -> AsyncIterator[tuple[SchedulerService, str]]:
    address = f"@test-scheduler-{secrets.token_hex(4)}"
    service = SchedulerService()
    server = await service.serve(address)
    yield service, address
    server.close()


def worker(address: str) -> RemoteScheduler:
    """What one gateway worker process uses (its own connection, its own fallback)."""
    return RemoteScheduler(address, Scheduler())


async def test_it_limits_an_engines_slots_across_workers(service) -> None:
    _, address = service
    first, second = worker(address), worker(address)
    order: list[str] = []

    async def use(remote: RemoteScheduler, name: str, hold: float) -> None:
        async with remote.slot(request(name)):
            order.append(f"{name} in")
            await asyncio.sleep(hold)
            order.append(f"{name} out")

    held = asyncio.ensure_future(use(first, "a", 0.3))
    await asyncio.sleep(0.05)
    await use(second, "b", 0.0)
    await held

    assert order == ["a in", "a out", "b in", "b out"]


async def test_it_queues_fairly_across_workers(service) -> None:
    """Alice's burst comes through one worker, Bob's single request through another: Bob
    is served within one grant of Alice's, not after her whole burst."""
    _, address = service
    alices, bobs = worker(address), worker(address)
    served: list[str] = []

    async def use(remote: RemoteScheduler, tenant: str, tag: str) -> None:
        async with remote.slot(request(tenant)):
            served.append(tag)
            await asyncio.sleep(0.02)

    burst = [asyncio.ensure_future(use(alices, "alice", f"a{i}")) for i in range(10)]
    await asyncio.sleep(0.05)  # alice holds the slot and has 9 waiting
    await asyncio.gather(use(bobs, "bob", "b"), *burst)

    assert served.index("b") <= 3


async def test_it_keeps_a_sessions_slot_whichever_worker_asks(service) -> None:
    """Worker 1 places session s1 on slot 1 (slot 0 is busy); later worker 2 gets slot 1
    again for it, though slot 0 is free by then: the prompt cache for s1 is there."""
    _, address = service
    first, second = worker(address), worker(address)

    async with (
        first.slot(request("x", session="other", slots=4)),
        first.slot(request("t", session="s1", slots=4)) as placed,
    ):
        pass
    async with second.slot(request("t", session="s1", slots=4)) as again:
        pass

    assert (placed.slot, again.slot, again.sticky) == (1, 1, True)


async def test_it_gives_back_a_cancelled_wait_and_a_dead_workers_slot(service) -> None:
    local, address = service
    holder, waiter = worker(address), worker(address)
    lease = holder.slot(request("a"))
    await lease.__aenter__()

    waiting = asyncio.ensure_future(waiter.slot(request("b")).__aenter__())
    await asyncio.sleep(0.05)
    waiting.cancel()
    await asyncio.sleep(0.05)
    assert local.scheduler.stats("e")["queued"] == 0

    (await holder.connection()).writer.close()  # the worker process died
    async with worker(address).slot(request("c", max_wait=2.0)):
        assert local.scheduler.stats("e")["in_flight"] == 1


async def test_it_answers_busy_from_the_service(service) -> None:
    _, address = service
    remote = worker(address)
    async with remote.slot(request("a")):
        with pytest.raises(SchedulerBusy) as busy:
            async with remote.slot(request("a", max_queue=0)):
                pass
    assert busy.value.reason == "queue_full"
    assert busy.value.retry_after >= 1


async def test_it_schedules_locally_when_the_service_is_unreachable() -> None:
    remote = worker(f"@nobody-listens-{secrets.token_hex(4)}")

    async with remote.slot(request("a")) as placement:
        assert remote.local.stats("e")["in_flight"] == 1

    assert (placement.replica, placement.slot) == (0, 0)
    assert remote.local.stats("e")["in_flight"] == 0


@pytest.mark.django_db(transaction=True)
def test_it_never_sends_an_engine_more_than_its_slots_from_two_workers(
    engine, alice, fake_engine, tmp_path
) -> None:
    from django.db import connection

    Engine.objects.filter(pk=engine.pk).update(slots=1)
    gateway = start_gateway(connection.settings_dict, tmp_path / "gw.log", workers=2)
    body = {"model": FAKE_MODEL, "messages": [{"role": "user", "content": "x"}]}
    statuses: list[int] = []

    def one() -> None:
        # A client per thread: separate connections land on both workers.
        with httpx.Client(timeout=60) as client:
            response = client.post(
                f"{gateway.base_url}/chat/completions",
                json={**body, "fake": {"delay": 0.3}},
                headers=alice.auth,
            )
            statuses.append(response.status_code)

    try:
        threads = [threading.Thread(target=one) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        gateway.stop()

    assert statuses == [200] * 6
    calls = [r for r in fake_engine.requests() if r["path"] == "/v1/chat/completions"]
    spans = sorted((r["started_at"], r["finished_at"]) for r in calls)
    assert len(spans) == 6
    overlaps = [(a, b) for a, b in itertools.pairwise(spans) if a[1] > b[0] + 0.01]
    assert overlaps == []


async def test_it_reports_an_engines_queue_host_wide(service, settings) -> None:
    """What the admin reads (blocking, from a sync view): the service's own counts."""
    from apps.engines.scheduler_service import scheduler_stats

    _, address = service
    settings.SCHEDULER_SOCKET = address
    holder, waiter = worker(address), worker(address)
    async with holder.slot(request("alice")):
        queued = asyncio.ensure_future(waiter.slot(request("bob")).__aenter__())
        await asyncio.sleep(0.05)
        stats = await asyncio.to_thread(scheduler_stats, "e")
        queued.cancel()

    assert (stats["in_flight"], stats["capacity"], stats["queued"]) == (1, 1, 1)
    assert stats["queued_by_tenant"] == {"bob": 1}


def test_it_reports_nothing_when_the_service_is_gone(settings) -> None:
    from apps.engines.scheduler_service import scheduler_stats

    settings.SCHEDULER_SOCKET = f"@nobody-listens-{secrets.token_hex(4)}"
    assert scheduler_stats("e") is None
