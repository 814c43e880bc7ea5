"""The async quota stage the /v1 pipeline calls: sizing, 429s, background settlement."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from channels.db import database_sync_to_async

from apps.proxy.errors import ApiError
from apps.quotas.models import QuotaWindow, Reservation
from apps.quotas.pipeline import (
    quota_stage_drain,
    quota_stage_reserve,
    quota_stage_settle,
    tokens_to_reserve,
)
from apps.quotas.services import quota_set
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
    quota_stage_settle(None, actual_tokens=5)
    await quota_stage_drain()
