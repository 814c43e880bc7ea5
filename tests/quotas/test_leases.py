"""Per-process quota leases (apps/quotas/leases.py): granted in memory, reserved in
PostgreSQL, charged at each renewal, never past a limit."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from channels.db import database_sync_to_async
from django.test import override_settings

from apps.core.errors import ApiError
from apps.quotas.leases import LEASE_MIN_REQUESTS, LEASE_SHARE, Lease
from apps.quotas.models import QuotaWindow, Reservation
from apps.quotas.services import quota_set, quotas_applicable
from apps.quotas.stage import quota_stage_drain, quota_stage_reserve, quota_stage_settle
from tests.conftest import TenantKey, start_gateway, wait_until
from tests.quotas.test_quotas_e2e import CHAT, RESERVED, USED, window

pytestmark = pytest.mark.django_db(transaction=True)

db = database_sync_to_async
TOKENS = 100


def window_state() -> tuple[int, int]:
    window = QuotaWindow.objects.get()
    return window.used_tokens, window.reserved_tokens


async def reserve(owner: TenantKey, tokens: int = TOKENS):
    quotas = await db(_quotas)(owner)
    return await quota_stage_reserve(
        tenant_id=owner.tenant.pk, api_key_id=owner.api_key.pk, tokens=tokens, quotas=quotas
    )


def _quotas(owner: TenantKey) -> list:
    return quotas_applicable(tenant_id=owner.tenant.pk, api_key_id=owner.api_key.pk)


async def leased_ticket(owner: TenantKey):
    """Reserve until this process holds a lease (the first request reserves alone)."""
    for _ in range(50):
        ticket = await reserve(owner)
        if ticket.lease is not None:
            return ticket
        quota_stage_settle(ticket, actual_tokens=0)
        await asyncio.sleep(0.01)
    raise AssertionError("no lease was taken")


@override_settings(QUOTA_LEASE_FLUSH_SECONDS=60)
async def test_it_grants_from_a_lease_without_a_reservation_per_request(alice) -> None:
    await db(quota_set)(tenant=alice.tenant, tokens=10_000_000, period="day")
    first = await leased_ticket(alice)
    tickets = [first] + [await reserve(alice) for _ in range(5)]

    assert all(t.lease is not None and t.reservation_id is None for t in tickets)
    # One reservation row, the lease, holds them all, and more than they need.
    lease = await db(Reservation.objects.get)()
    assert lease.tokens >= 6 * TOKENS
    used, reserved = await db(window_state)()
    assert (used, reserved) == (0, lease.tokens)
    # The headers count what this process holds, as with reservations made alone.
    remaining = [ticket.states[0].remaining for ticket in tickets]
    assert remaining == [remaining[0] - n * TOKENS for n in range(6)]
    assert remaining[0] <= 10_000_000 - TOKENS
    for ticket in tickets:
        quota_stage_settle(ticket, actual_tokens=7)
    await quota_stage_drain()
    assert await db(window_state)() == (6 * 7, 0)
    assert not await db(Reservation.objects.exists)()


@override_settings(QUOTA_LEASE_FLUSH_SECONDS=0.05, QUOTA_LEASE_IDLE_SECONDS=0.1)
async def test_it_charges_usage_at_the_next_renewal_and_ends_idle_leases(alice) -> None:
    await db(quota_set)(tenant=alice.tenant, tokens=10_000_000, period="day")
    ticket = await leased_ticket(alice)
    quota_stage_settle(ticket, actual_tokens=30)
    quota_stage_settle(ticket, actual_tokens=30)  # a second call changes nothing

    async def settled() -> bool:
        return await db(window_state)() == (30, 0)

    for _ in range(100):  # charged by the next renewal; then, idle, the lease ends
        if await settled():
            break
        await asyncio.sleep(0.02)
    assert await settled()
    assert not await db(Reservation.objects.exists)()
    await quota_stage_drain()


@override_settings(QUOTA_LEASE_FLUSH_SECONDS=0.05, QUOTA_LEASE_IDLE_SECONDS=60)
async def test_it_keeps_an_idle_lease_for_the_next_burst_without_round_trips(alice) -> None:
    await db(quota_set)(tenant=alice.tenant, tokens=10_000_000, period="day")
    ticket = await leased_ticket(alice)
    quota_stage_settle(ticket, actual_tokens=30)
    for _ in range(100):  # charged by the next renewal
        if (await db(window_state)())[0] == 30:
            break
        await asyncio.sleep(0.02)
    renewed_at = await db(Reservation.objects.values_list("pk", flat=True).get)()

    await asyncio.sleep(0.3)  # six intervals with nothing granted
    later = await reserve(alice)

    assert later.lease is not None  # granted in memory
    assert later.reservation_id is None
    # Nothing went to PostgreSQL while idle: the same lease row, still reserved.
    assert await db(Reservation.objects.values_list("pk", flat=True).get)() == renewed_at
    quota_stage_settle(later, actual_tokens=0)
    await quota_stage_drain()


async def test_it_never_leases_a_window_with_little_left(alice) -> None:
    await db(quota_set)(tenant=alice.tenant, tokens=(LEASE_MIN_REQUESTS - 1) * TOKENS, period="day")
    for _ in range(10):
        ticket = await reserve(alice)
        await asyncio.sleep(0.01)
        assert ticket.lease is None
        assert ticket.reservation_id is not None
        quota_stage_settle(ticket, actual_tokens=TOKENS)
    await quota_stage_drain()
    assert await db(window_state)() == (10 * TOKENS, 0)


@override_settings(QUOTA_LEASE_FLUSH_SECONDS=60)
async def test_it_gives_its_spare_tokens_back_before_refusing_a_request(alice) -> None:
    limit = 100 * LEASE_MIN_REQUESTS * TOKENS
    await db(quota_set)(tenant=alice.tenant, tokens=limit, period="day")
    ticket = await leased_ticket(alice)
    lease = await db(Reservation.objects.get)()
    assert lease.tokens > ticket.tokens  # spare tokens held by this process
    _, reserved = await db(window_state)()

    # Fits only if the spare leased tokens go back: limit - what is really held.
    big = await reserve(alice, tokens=limit - TOKENS)
    assert big.lease is None
    assert big.reservation_id is not None
    with pytest.raises(ApiError):  # and nothing is left for anyone now
        await reserve(alice, tokens=1)

    quota_stage_settle(ticket, actual_tokens=TOKENS)
    quota_stage_settle(big, actual_tokens=0)
    await quota_stage_drain()
    assert await db(window_state)() == (TOKENS, 0)
    assert reserved == lease.tokens


@override_settings(QUOTA_LEASE_FLUSH_SECONDS=60)
async def test_it_leases_nothing_while_one_of_a_requests_quotas_runs_low(alice) -> None:
    await db(quota_set)(tenant=alice.tenant, tokens=10_000_000, period="day")
    small = (LEASE_MIN_REQUESTS - 1) * TOKENS
    await db(quota_set)(tenant=alice.tenant, tokens=small, period="hour", api_key=alice.api_key)
    for _ in range(5):
        ticket = await reserve(alice)
        await asyncio.sleep(0.01)
        assert ticket.lease is None
        quota_stage_settle(ticket, actual_tokens=TOKENS)
    await asyncio.sleep(0.2)  # the settlements are done; a lease would still hold tokens
    assert not await db(Reservation.objects.exists)()
    await quota_stage_drain()
    windows = await db(
        lambda: sorted(QuotaWindow.objects.values_list("used_tokens", "reserved_tokens"))
    )()
    assert windows == [(5 * TOKENS, 0), (5 * TOKENS, 0)]
    assert not await db(Reservation.objects.exists)()


@override_settings(QUOTA_LEASES=False)
async def test_it_reserves_every_request_alone_with_leases_off(alice) -> None:
    await db(quota_set)(tenant=alice.tenant, tokens=10_000_000, period="day")
    for _ in range(5):
        ticket = await reserve(alice)
        await asyncio.sleep(0.01)
        assert ticket.lease is None
        quota_stage_settle(ticket, actual_tokens=1)
    await quota_stage_drain()
    assert await db(window_state)() == (5, 0)


def test_a_lease_takes_at_most_a_share_of_what_is_left() -> None:
    lease = Lease(quota_id=1, start=None, tenant_id=1, largest=10, granted=10_000,
                  limit=100_000, window_used=20_000, others_reserved=0)  # fmt: skip
    assert lease.target() == 80_000 // LEASE_SHARE
    lease.granted, lease.size = 0, 5_000
    assert lease.target() == 5_000  # idle for now: it keeps its spare tokens
    lease.last_granted_at -= 3600
    assert lease.target() == 0  # idle too long: the lease ends
    lease.granted, lease.window_used = 10, 100_000 - LEASE_MIN_REQUESTS * 10 + 1
    assert lease.target() == 0  # too little left: every request reserves alone


# --- through gateway processes ---------------------------------------------------------


def test_it_charges_leased_usage_exactly_when_the_gateway_stops(engine, alice, tmp_path):
    from django.db import connection

    quota_set(tenant=alice.tenant, tokens=10_000_000, period="day")
    gateway = start_gateway(
        connection.settings_dict,
        tmp_path / "gw.log",
        env={"QUOTA_LEASE_FLUSH_SECONDS": "600", "QUOTA_LEASE_IDLE_SECONDS": "600"},
    )
    try:
        with httpx.Client(base_url=gateway.base_url, headers=alice.auth, timeout=10) as client:
            for _ in range(30):
                assert client.post("/chat/completions", json=CHAT).status_code == 200
        # Only the requests before the lease were charged one by one; the lease holds
        # the rest of the usage and, reserved, more than it.
        running = window(alice.tenant)
        assert running.used_tokens < 30 * USED
        assert running.reserved_tokens > 0
    finally:
        gateway.stop()
    stopped = window(alice.tenant)
    assert (stopped.used_tokens, stopped.reserved_tokens) == (30 * USED, 0)


def test_it_never_exceeds_a_leased_quota_across_gateway_processes(engine, alice, tmp_path):
    from django.db import connection

    # Each request uses exactly what it reserves (see test_quotas_e2e). The quota starts
    # with room for 300, so both processes lease, then run it down to where every request
    # reserves alone.
    exact = {**CHAT, "fake": {"chunks": RESERVED - 1}}
    fits = 300
    quota_set(tenant=alice.tenant, tokens=fits * RESERVED, period="day")
    env = {"QUOTA_LEASE_FLUSH_SECONDS": "0.05"}
    gateways = [start_gateway(connection.settings_dict, tmp_path / f"gw{i}.log", env=env)
                for i in range(2)]  # fmt: skip

    async def burst() -> list[int]:
        limits = httpx.Limits(max_connections=40)
        async with httpx.AsyncClient(timeout=30, limits=limits, headers=alice.auth) as client:
            requests = [
                client.post(f"{gateways[i % 2].base_url}/chat/completions", json=exact)
                for i in range(fits + 100)
            ]
            return [r.status_code for r in await asyncio.gather(*requests)]

    try:
        statuses = asyncio.run(burst())
    finally:
        for gateway in gateways:
            gateway.stop()
    granted = statuses.count(200)
    assert statuses.count(200) + statuses.count(429) == len(statuses)
    settled = window(alice.tenant)
    assert settled.used_tokens == granted * RESERVED
    assert settled.reserved_tokens == 0
    assert granted <= fits  # never past the limit
    # Spare tokens of the other process's lease may refuse a request that would just fit,
    # while it still holds them (at most 1/16 of what was left): a few at most.
    assert granted >= fits - 5
    wait_until(lambda: not Reservation.objects.exists())
