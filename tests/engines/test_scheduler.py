"""The slot scheduler: capacity, fairness across tenants, bounds, cancellation, stickiness."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections import Counter

import pytest

from apps.engines.scheduler import Placement, Scheduler, SchedulerBusy, SlotRequest, scheduler

ENGINE = "llama"


def request(tenant: str = "acme", **overrides) -> SlotRequest:
    options = {"replicas": 1, "slots": 1, "max_queue": 1000, "max_wait": 5.0, **overrides}
    return SlotRequest(ENGINE, tenant=tenant, **options)


def lease(sched: Scheduler, tenant: str = "acme", **overrides):
    return sched.slot(request(tenant, **overrides))


async def settle(rounds: int = 5) -> None:
    """Let every ready task run until it blocks (enqueues, or takes a slot)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def hold(sched: Scheduler, tenant: str = "acme", **overrides) -> tuple[Placement, object]:
    """Acquire a slot outside `async with`, to release it at a chosen moment."""
    held = lease(sched, tenant, **overrides)
    return await held.__aenter__(), held


async def run_queued(
    sched: Scheduler, gate: asyncio.Event, order: list[str], tenant: str, **overrides
) -> None:
    async with lease(sched, tenant, **overrides):
        order.append(tenant)
        await gate.wait()


def test_it_exposes_a_module_singleton() -> None:
    assert isinstance(scheduler, Scheduler)


async def test_it_grants_uncontended_without_suspending() -> None:
    sched = Scheduler()
    enter = lease(sched, replicas=2, slots=2).__aenter__()
    with pytest.raises(StopIteration) as done:
        enter.send(None)  # finishes in one step: no await on a future, no task
    placement = done.value.value
    assert (placement.replica, placement.slot, placement.waited) == (0, 0, 0.0)
    assert sched.stats(ENGINE)["in_flight"] == 1


async def test_it_releases_on_exit_and_on_exception() -> None:
    sched = Scheduler()
    async with lease(sched) as placement:
        assert placement.slot == 0
        assert sched.stats(ENGINE)["in_flight"] == 1
    with pytest.raises(RuntimeError):
        async with lease(sched):
            raise RuntimeError("engine call failed")
    stats = sched.stats(ENGINE)
    assert (stats["in_flight"], stats["granted"]) == (0, 2)


async def test_it_spreads_requests_by_load_then_lowest_slot() -> None:
    sched = Scheduler()
    placements = [(await hold(sched, replicas=2, slots=2))[0] for _ in range(4)]
    assert [(p.replica, p.slot) for p in placements] == [(0, 0), (1, 0), (0, 1), (1, 1)]


async def test_it_never_exceeds_the_slots_of_a_replica() -> None:
    sched = Scheduler(sticky_wait=0.01)
    replicas, slots = 3, 2
    occupied: set[tuple[int, int]] = set()
    in_flight = [0] * replicas
    peak = [0] * replicas
    rng = random.Random(7)

    async def request(i: int) -> None:
        session = f"s{rng.randrange(10)}" if i % 2 else None
        async with lease(
            sched, f"t{i % 4}", replicas=replicas, slots=slots, session=session
        ) as placement:
            key = (placement.replica, placement.slot)
            assert key not in occupied
            assert 0 <= placement.slot < slots
            occupied.add(key)
            in_flight[placement.replica] += 1
            peak[placement.replica] = max(peak[placement.replica], in_flight[placement.replica])
            await settle(rng.randrange(1, 4))
            in_flight[placement.replica] -= 1
            occupied.discard(key)

    await asyncio.gather(*(request(i) for i in range(200)))
    assert peak == [slots] * replicas
    stats = sched.stats(ENGINE)
    assert (stats["in_flight"], stats["queued"], stats["granted"]) == (0, 0, 200)


async def test_it_serves_a_tenant_in_arrival_order() -> None:
    sched = Scheduler()
    _, held = await hold(sched)
    order: list[int] = []

    async def request(i: int) -> None:
        async with lease(sched):
            order.append(i)

    tasks = []
    for i in range(10):
        tasks.append(asyncio.create_task(request(i)))
        await settle(1)
    await held.__aexit__(None, None, None)
    await asyncio.gather(*tasks)
    assert order == list(range(10))


async def test_it_serves_a_single_request_before_another_tenants_burst() -> None:
    sched = Scheduler()
    gate = asyncio.Event()
    order: list[str] = []
    burst = [asyncio.create_task(run_queued(sched, gate, order, "a")) for _ in range(50)]
    await settle()
    assert sched.stats(ENGINE)["queued_by_tenant"] == {"a": 49}
    single = asyncio.create_task(run_queued(sched, gate, order, "b"))
    await settle()
    granted_before = len(order)
    gate.set()
    await asyncio.gather(*burst, single)
    assert order.index("b") - granted_before < 2  # within 2 grants of its arrival


async def test_it_shares_slots_by_weight_under_saturation() -> None:
    sched = Scheduler()
    gate = asyncio.Event()
    order: list[str] = []
    tasks = [
        asyncio.create_task(run_queued(sched, gate, order, tenant, weight=weight, slots=2))
        for _ in range(90)
        for tenant, weight in (("heavy", 2), ("light", 1))
    ]
    await settle()
    gate.set()
    await asyncio.gather(*tasks)
    served = Counter(order[:90])  # both tenants still have a backlog here
    assert served["heavy"] == pytest.approx(60, abs=2)
    assert served["light"] == pytest.approx(30, abs=2)


async def test_it_rejects_at_once_when_the_queue_is_full() -> None:
    sched = Scheduler()
    _, held = await hold(sched)
    waiters = [asyncio.create_task(lease(sched, max_queue=2).__aenter__()) for _ in range(2)]
    await settle()
    started = time.monotonic()
    with pytest.raises(SchedulerBusy) as busy:
        await lease(sched, max_queue=2).__aenter__()
    assert time.monotonic() - started < 0.05
    assert busy.value.reason == "queue_full"
    assert isinstance(busy.value.retry_after, int)
    assert busy.value.retry_after >= 1
    assert sched.stats(ENGINE)["rejected_queue_full"] == 1
    for task in waiters:
        task.cancel()
    await held.__aexit__(None, None, None)


async def test_it_estimates_retry_after_from_hold_time_and_queue() -> None:
    sched = Scheduler()
    placement = await sched.acquire(request("a", max_queue=9, max_wait=1))
    sched.release(dataclasses.replace(placement, granted_at=placement.granted_at - 3.99))
    await hold(sched)  # the average hold is now ~3.99 s
    waiters = [asyncio.create_task(lease(sched).__aenter__()) for _ in range(2)]
    await settle()
    with pytest.raises(SchedulerBusy) as busy:
        await lease(sched, max_queue=2).__aenter__()
    assert busy.value.retry_after == 12  # 4 s x (2 queued + this one) / 1 slot
    for task in waiters:
        task.cancel()
    await settle()


async def test_it_gives_up_after_max_wait_and_leaves_the_queue() -> None:
    sched = Scheduler()
    _, held = await hold(sched)
    started = time.monotonic()
    with pytest.raises(SchedulerBusy) as busy:
        async with lease(sched, max_wait=0.05):
            pass
    assert 0.04 <= time.monotonic() - started < 1.0
    assert busy.value.reason == "wait_timeout"
    assert busy.value.retry_after >= 1
    stats = sched.stats(ENGINE)
    assert (stats["queued"], stats["queued_by_tenant"], stats["rejected_wait_timeout"]) == (
        0,
        {},
        1,
    )
    await held.__aexit__(None, None, None)
    assert sched.stats(ENGINE)["in_flight"] == 0


async def test_it_lets_a_cancelled_waiter_go_without_a_trace() -> None:
    sched = Scheduler()
    _, held = await hold(sched)
    order: list[str] = []
    gate = asyncio.Event()
    gate.set()
    cancelled = asyncio.create_task(run_queued(sched, gate, order, "a"))
    patient = asyncio.create_task(run_queued(sched, gate, order, "b"))
    await settle()
    cancelled.cancel()
    await settle()
    assert sched.stats(ENGINE)["queued_by_tenant"] == {"b": 1}
    await held.__aexit__(None, None, None)
    await patient
    assert order == ["b"]
    stats = sched.stats(ENGINE)
    assert (stats["in_flight"], stats["queued"], stats["cancelled_waiting"]) == (0, 0, 1)


async def test_it_takes_back_a_slot_granted_to_a_waiter_cancelled_meanwhile() -> None:
    sched = Scheduler()
    _, held = await hold(sched)
    order: list[str] = []
    gate = asyncio.Event()
    gate.set()
    unlucky = asyncio.create_task(run_queued(sched, gate, order, "a"))
    patient = asyncio.create_task(run_queued(sched, gate, order, "b"))
    await settle()
    await held.__aexit__(None, None, None)  # grants the slot to `unlucky`...
    unlucky.cancel()  # ...which is cancelled before it could run
    await asyncio.gather(unlucky, patient, return_exceptions=True)
    assert order == ["b"]
    assert sched.stats(ENGINE)["in_flight"] == 0


async def test_it_keeps_a_session_on_its_replica_and_slot() -> None:
    sched = Scheduler()
    _, other = await hold(sched, "x", replicas=2, slots=2)  # replica 0 is busier now
    seen = set()
    for _ in range(3):
        async with lease(sched, replicas=2, slots=2, session="chat-1") as placement:
            seen.add((placement.replica, placement.slot))
    assert seen == {(1, 0)}
    assert sched.stats(ENGINE)["sticky_hits"] == 2
    await other.__aexit__(None, None, None)


async def test_it_spreads_new_sessions_across_replicas() -> None:
    sched = Scheduler()
    placements = [
        (await hold(sched, replicas=3, slots=2, session=f"chat-{i}"))[0] for i in range(3)
    ]
    assert [p.replica for p in placements] == [0, 1, 2]


async def test_it_places_requests_on_the_replicas_it_is_told_to_prefer() -> None:
    """Replica 1 runs the variant wanted: new requests go there while it has room, then
    by load; a queued request keeps its order too."""
    sched = Scheduler()
    order = {"replicas": 3, "slots": 1, "replica_order": (1, 2)}
    first, _ = await hold(sched, **order)
    second, _ = await hold(sched, **order)
    third, _ = await hold(sched, **order)
    assert [first.replica, second.replica, third.replica] == [1, 2, 0]


async def test_it_never_lets_a_preference_keep_a_request_waiting() -> None:
    sched = Scheduler()
    held = [await hold(sched, replicas=2, slots=1) for _ in range(2)]  # both busy
    waiting = asyncio.ensure_future(
        sched.acquire(request("b", replicas=2, max_queue=10, replica_order=(1,)))
    )  # fmt: skip
    await settle()
    await held[0][1].__aexit__(None, None, None)  # replica 0 frees first: not preferred,
    placement = await asyncio.wait_for(waiting, 1)  # but still taken rather than waiting
    assert placement.replica == 0


async def test_it_waits_briefly_for_a_sessions_busy_slot() -> None:
    sched = Scheduler(sticky_wait=1.0)
    async with lease(sched, slots=2, session="chat-1") as first:
        pass
    _, other = await hold(sched, "x", slots=2)  # takes slot 0, the session's slot
    asyncio.get_running_loop().call_later(0.02, asyncio.ensure_future, other.__aexit__())
    async with lease(sched, slots=2, session="chat-1") as again:
        assert (again.slot, again.sticky) == (first.slot, True)
        assert 0.01 < again.waited < 0.5


async def test_it_moves_a_session_when_its_slot_stays_busy() -> None:
    sched = Scheduler(sticky_wait=0.05)
    async with lease(sched, slots=2, session="chat-1"):
        pass
    _, other = await hold(sched, "x", slots=2)
    async with lease(sched, slots=2, session="chat-1") as moved:
        assert (moved.slot, moved.sticky) == (1, False)
        assert moved.waited >= 0.04
    await other.__aexit__(None, None, None)
    async with lease(sched, slots=2, session="chat-1") as again:
        assert (again.slot, again.sticky) == (1, True)  # the new slot is remembered
    assert sched.stats(ENGINE)["sticky_moves"] == 1


async def test_it_takes_another_slot_at_once_when_the_cache_is_not_worth_waiting_for() -> None:
    sched = Scheduler(sticky_wait=5.0)
    async with lease(sched, slots=2, session="chat-1") as first:
        pass
    _, other = await hold(sched, "x", slots=2)  # takes slot 0, the session's slot
    async with lease(sched, slots=2, session="chat-1", insist=False) as moved:
        assert (moved.slot, moved.sticky, moved.waited) == (1, False, 0.0)
    await other.__aexit__(None, None, None)
    async with lease(sched, slots=2, session="chat-1", insist=False) as again:
        assert (again.slot, again.sticky) == (1, True)  # a free remembered slot still wins
    assert first.slot == 0
    assert sched.stats(ENGINE)["granted_after_wait"] == 0


async def test_it_does_not_let_a_sticky_waiter_block_others() -> None:
    sched = Scheduler(sticky_wait=5.0)
    async with lease(sched, slots=2, session="chat-1"):
        pass
    _, other = await hold(sched, "x", slots=2)
    sticky = asyncio.create_task(lease(sched, slots=2, session="chat-1").__aenter__())
    await settle()
    async with lease(sched, "y", slots=2) as placement:  # the free slot is not reserved
        assert placement.slot == 1
    await other.__aexit__(None, None, None)
    assert (await sticky).slot == 0


async def test_it_forgets_the_oldest_sessions_beyond_the_bound() -> None:
    sched = Scheduler(max_sessions=2)
    for session in ("s1", "s2", "s3"):
        async with lease(sched, session=session):
            pass
    async with lease(sched, session="s3") as remembered:
        assert remembered.sticky
    async with lease(sched, session="s1") as forgotten:
        assert not forgotten.sticky


async def test_it_reports_stats() -> None:
    sched = Scheduler()
    async with lease(sched, "a", replicas=2, slots=2):
        stats = sched.stats(ENGINE)
        assert stats["per_replica"][0]["in_flight"] == 1
        assert stats["per_replica"][0]["busy_slots"] == [0]
    stats = sched.stats(ENGINE)
    assert stats["capacity"] == 4
    assert stats["in_flight"] == 0
    assert stats["granted_by_tenant"] == {"a": 1}
    assert stats["avg_wait_seconds"] == 0.0
    assert stats["per_replica"][0]["granted"] == 1
    assert stats["per_replica"][1]["granted"] == 0
    assert sched.stats("unknown")["granted"] == 0


async def test_it_follows_a_change_of_capacity() -> None:
    sched = Scheduler()
    _, held = await hold(sched)
    waiter = asyncio.create_task(lease(sched).__aenter__())
    await settle()
    with pytest.raises(SchedulerBusy):  # the added slot went to the waiter first
        await lease(sched, slots=2, max_queue=0).__aenter__()
    drained = await waiter
    assert drained.slot == 1
    await held.__aexit__(None, None, None)
    # Back to one slot while slot 1 is busy: slot 1 drains, only slot 0 is handed out.
    async with lease(sched, max_queue=0) as placement:
        assert placement.slot == 0
    sched.release(drained)
    async with lease(sched, max_queue=0) as placement:
        assert placement.slot == 0
    assert sched.stats(ENGINE)["in_flight"] == 0
