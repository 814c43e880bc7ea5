"""The async quota stage the /v1 pipeline calls: sizing, 429s, background settlement."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from channels.db import database_sync_to_async

from apps.core.errors import ApiError
from apps.quotas.models import QuotaWindow, Reservation
from apps.quotas.services import quota_set
from apps.quotas.stage import (
    quota_stage_drain,
    quota_stage_reserve,
    quota_stage_settle,
    tokens_to_reserve,
)
from tests.conftest import TenantKey

# Channels' wrapper closes the thread's connection afterwards (asgiref's would keep it
# open, and the test database could not be dropped at the end).
db = database_sync_to_async


def window_state() -> tuple[int, int]:
    window = QuotaWindow.objects.get()
    return window.used_tokens, window.reserved_tokens


@pytest.mark.parametrize(
    ("payload", "kwargs", "tokens"),
    [
        ({"max_tokens": 50}, {"ctx_size": 4096}, 150),
        ({"max_completion_tokens": 20, "max_tokens": 50}, {"ctx_size": 4096}, 120),
        ({"max_tokens": 50, "n": 3}, {"ctx_size": None}, 250),
        ({}, {"ctx_size": 4096}, 4096),  # no limit asked: whatever the context leaves
        ({}, {"ctx_size": None}, 100 + 512),  # nothing known: DEFAULT_MAX_TOKENS
        ({"max_tokens": "50"}, {"ctx_size": 1000}, 1000),  # not an int: ignored
        ({"max_tokens": 50}, {"ctx_size": 4096, "completes": False}, 100),  # embeddings
    ],
)
def test_it_sizes_a_reservation_for_the_worst_case(
    payload: dict[str, Any], kwargs: dict[str, Any], tokens: int
) -> None:
    assert tokens_to_reserve(payload, prompt_tokens=100, **kwargs) == tokens


@pytest.mark.django_db(transaction=True)
async def test_it_reserves_and_settles_in_the_background(alice: TenantKey) -> None:
    await db(quota_set)(tenant=alice.tenant, tokens=1000, period="day")

    ticket = await quota_stage_reserve(
        tenant_id=alice.tenant.pk, api_key_id=alice.api_key.pk, tokens=600
    )
    quota_stage_settle(ticket, actual_tokens=250)
    quota_stage_settle(ticket, actual_tokens=250)  # a second call changes nothing
    await quota_stage_drain()

    assert await db(window_state)() == (250, 0)
    assert not await db(Reservation.objects.exists)()


@pytest.mark.django_db(transaction=True)
async def test_it_answers_429_when_the_quota_is_spent(alice: TenantKey) -> None:
    await db(quota_set)(tenant=alice.tenant, tokens=100, period="hour")

    with pytest.raises(ApiError) as exc:
        await quota_stage_reserve(
            tenant_id=alice.tenant.pk, api_key_id=alice.api_key.pk, tokens=101
        )

    assert (exc.value.status, exc.value.code) == (429, "insufficient_quota")
    assert exc.value.headers[0][0] == b"retry-after"


@pytest.mark.django_db(transaction=True)
async def test_it_settles_even_when_the_request_task_is_cancelled(alice: TenantKey) -> None:
    await db(quota_set)(tenant=alice.tenant, tokens=1000, period="day")
    reserved = asyncio.Event()

    async def request() -> None:
        ticket = await quota_stage_reserve(
            tenant_id=alice.tenant.pk, api_key_id=alice.api_key.pk, tokens=500
        )
        try:
            reserved.set()
            await asyncio.sleep(60)  # streaming, until the client disconnects
        finally:
            quota_stage_settle(ticket, actual_tokens=120)

    task = asyncio.ensure_future(request())
    await reserved.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await quota_stage_drain()

    assert await db(window_state)() == (120, 0)


async def test_it_does_nothing_for_a_request_without_quota() -> None:
    tasks = asyncio.all_tasks()

    quota_stage_settle(None, actual_tokens=5)

    assert asyncio.all_tasks() == tasks  # no settlement started, so nothing to write
    await quota_stage_drain()


# --- batched reservations (apps/quotas/batching.py) ----------------------------------


def applicable(owner: TenantKey) -> list:
    from apps.quotas.services import quotas_applicable

    return quotas_applicable(tenant_id=owner.tenant.pk, api_key_id=owner.api_key.pk)


async def reserve(owner: TenantKey, tokens: int, quotas: list):
    return await quota_stage_reserve(
        tenant_id=owner.tenant.pk, api_key_id=owner.api_key.pk, tokens=tokens, quotas=quotas
    )


@pytest.mark.django_db(transaction=True)
async def test_it_grants_exactly_what_fits_to_a_concurrent_batch(alice: TenantKey) -> None:
    await db(quota_set)(tenant=alice.tenant, tokens=1000, period="day")
    quotas = await db(applicable)(alice)

    results = await asyncio.gather(
        *(reserve(alice, 100, quotas) for _ in range(25)), return_exceptions=True
    )

    granted = [r for r in results if not isinstance(r, Exception)]
    refused = [r for r in results if isinstance(r, ApiError)]
    assert (len(granted), len(refused)) == (10, 15)
    assert {r.code for r in refused} == {"insufficient_quota"}
    # Each grant saw those before it, in arrival order: 900 left, then 800, ..., then 0.
    assert sorted(t.states[0].remaining for t in granted) == list(range(0, 1000, 100))
    for ticket in granted:
        quota_stage_settle(ticket, actual_tokens=10)
    await quota_stage_drain()
    assert await db(window_state)() == (100, 0)


@pytest.mark.django_db(transaction=True)
async def test_it_gives_back_what_a_cancelled_request_was_granted(alice: TenantKey) -> None:
    await db(quota_set)(tenant=alice.tenant, tokens=1000, period="day")
    quotas = await db(applicable)(alice)

    task = asyncio.ensure_future(reserve(alice, 300, quotas))
    await asyncio.sleep(0)  # the reservation is in the batch, its answer not yet back
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.5)
    await quota_stage_drain()

    assert await db(window_state)() == (0, 0)
    assert not await db(Reservation.objects.exists)()


@pytest.mark.django_db(transaction=True)
async def test_it_reserves_alone_when_a_quota_vanished_under_the_batch(alice: TenantKey) -> None:
    from apps.quotas.models import Quota

    await db(quota_set)(tenant=alice.tenant, tokens=1000, period="day")
    quotas = await db(applicable)(alice)
    await db(lambda: Quota.objects.all().delete())()  # the cached quotas are stale now

    ticket = await reserve(alice, 100, quotas)

    assert ticket.states == []  # no quota applies any more: nothing held
    await quota_stage_drain()


@pytest.mark.django_db(transaction=True)
async def test_it_keeps_a_batch_going_when_one_of_its_requests_breaks_it(
    alice: TenantKey, bob: TenantKey
) -> None:
    """Bob's cached quota was deleted: his item makes the batch fail as a whole, so every
    item is redone alone; Alice's reservation still holds, and Bob's finds no quota."""
    from apps.quotas.models import Quota

    await db(quota_set)(tenant=alice.tenant, tokens=1000, period="day")
    await db(quota_set)(tenant=bob.tenant, tokens=1000, period="day")
    alices, bobs = await db(applicable)(alice), await db(applicable)(bob)
    await db(lambda: Quota.objects.filter(tenant=bob.tenant).delete())()

    alice_ticket, bob_ticket = await asyncio.gather(
        reserve(alice, 100, alices), reserve(bob, 100, bobs)
    )

    assert alice_ticket.states[0].remaining == 900
    assert bob_ticket.states == []
    quota_stage_settle(alice_ticket, actual_tokens=0)
    await quota_stage_drain()
