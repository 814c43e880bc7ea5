"""Quota states and token usage from request logs."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from apps.quotas.selectors import (
    DayUsage,
    quota_states,
    usage_by_day,
    usage_totals,
)
from apps.quotas.services import quota_reserve, quota_set, quota_settle
from apps.request_logs.models import RequestLog
from apps.tenants.services import api_key_create
from tests.conftest import TenantKey

pytestmark = pytest.mark.django_db

NOW = datetime(2026, 11, 22, 18, 30, tzinfo=UTC)


def log(owner: TenantKey, when: datetime, prompt: int, completion: int, key=None) -> None:
    RequestLog.objects.create(
        tenant=owner.tenant,
        api_key=key or owner.api_key,
        created_at=when,
        endpoint="chat.completions",
        status_code=200,
        prompt_tokens=prompt,
        completion_tokens=completion,
        latency_ms=1.0,
    )


def test_it_lists_quota_states_tightest_first(alice: TenantKey) -> None:
    quota_set(tenant=alice.tenant, tokens=10_000, period="month")
    quota_set(tenant=alice.tenant, tokens=700, period="hour", api_key=alice.api_key)
    day = quota_set(tenant=alice.tenant, tokens=1000, period="day")
    ticket = quota_reserve(
        tenant_id=alice.tenant.pk, api_key_id=alice.api_key.pk, tokens=700, now=NOW
    )
    quota_settle(ticket=ticket, actual_tokens=600)
    quota_reserve(tenant_id=alice.tenant.pk, api_key_id=alice.api_key.pk, tokens=100, now=NOW)

    states = quota_states(tenant_id=alice.tenant.pk, api_key_id=alice.api_key.pk, now=NOW)

    assert [(s.scope, s.period, s.used, s.reserved, s.remaining) for s in states] == [
        ("key default", "hour", 600, 100, 0),
        ("tenant", "day", 600, 100, 300),
        ("tenant", "month", 600, 100, 9300),
    ]
    assert states[1].quota_id == day.pk
    assert states[1].resets_at == datetime(2026, 11, 23, tzinfo=UTC)


def test_it_reads_states_of_windows_not_yet_created_as_unused(alice: TenantKey) -> None:
    quota_set(tenant=alice.tenant, tokens=1000, period="day")
    quota_reserve(tenant_id=alice.tenant.pk, api_key_id=alice.api_key.pk, tokens=100, now=NOW)

    [state] = quota_states(tenant_id=alice.tenant.pk, now=NOW + timedelta(days=1))

    assert (state.used, state.reserved, state.remaining) == (0, 0, 1000)


def test_it_separates_keys_and_tenants_in_quota_states(alice: TenantKey, bob: TenantKey) -> None:
    other = api_key_create(tenant=alice.tenant, name="other").api_key
    quota_set(tenant=alice.tenant, tokens=1000, period="day")
    quota_set(tenant=alice.tenant, tokens=10, period="day", api_key=other)
    quota_set(tenant=bob.tenant, tokens=5, period="day")

    mine = quota_states(tenant_id=alice.tenant.pk, api_key_id=alice.api_key.pk)
    everything = quota_states(tenant_id=alice.tenant.pk)

    assert [s.scope for s in mine] == ["tenant"]
    assert sorted(s.scope for s in everything) == ["key other", "tenant"]


def test_it_reads_quota_states_in_one_query(alice: TenantKey) -> None:
    for period in ("hour", "day", "month", "total"):
        quota_set(tenant=alice.tenant, tokens=1000, period=period)
        quota_set(tenant=alice.tenant, tokens=100, period=period, api_key=alice.api_key)

    with CaptureQueriesContext(connection) as ctx:
        assert len(quota_states(tenant_id=alice.tenant.pk)) == 8

    assert len(ctx.captured_queries) == 1


def test_it_sums_tokens_per_utc_day_with_empty_days(alice: TenantKey, bob: TenantKey) -> None:
    log(alice, datetime(2026, 11, 22, 0, 0, tzinfo=UTC), 10, 5)
    log(alice, datetime(2026, 11, 22, 23, 59, tzinfo=UTC), 1, 2)
    log(alice, datetime(2026, 11, 20, 12, 0, tzinfo=UTC), 100, 50)
    log(alice, datetime(2026, 11, 19, 23, 59, tzinfo=UTC), 7, 7)  # before the 3 days
    log(bob, datetime(2026, 11, 22, 12, 0, tzinfo=UTC), 1000, 1000)

    days = usage_by_day(tenant_id=alice.tenant.pk, days=3, now=NOW)

    assert days == [
        DayUsage(date(2026, 11, 20), 100, 50),
        DayUsage(date(2026, 11, 21), 0, 0),
        DayUsage(date(2026, 11, 22), 11, 7),
    ]
    assert days[0].total_tokens == 150


def test_it_defaults_to_the_last_30_days(alice: TenantKey) -> None:
    days = usage_by_day(tenant_id=alice.tenant.pk, now=NOW)

    assert len(days) == 30
    assert days[-1].day == date(2026, 11, 22)


def test_it_filters_usage_by_key(alice: TenantKey) -> None:
    other = api_key_create(tenant=alice.tenant, name="other").api_key
    log(alice, NOW, 10, 5)
    log(alice, NOW, 3, 3, key=other)

    [today] = usage_by_day(tenant_id=alice.tenant.pk, api_key_id=other.pk, days=1, now=NOW)

    assert (today.prompt_tokens, today.completion_tokens) == (3, 3)


def test_it_totals_usage_per_key_heaviest_first(alice: TenantKey, bob: TenantKey) -> None:
    other = api_key_create(tenant=alice.tenant, name="other").api_key
    idle = api_key_create(tenant=alice.tenant, name="idle").api_key
    gone = api_key_create(tenant=alice.tenant, name="gone").api_key
    log(alice, NOW, 10, 5)
    log(alice, NOW - timedelta(hours=1), 10, 5)
    log(alice, NOW, 300, 3, key=other)
    log(alice, NOW, 1, 1, key=gone)
    log(alice, NOW - timedelta(days=40), 9999, 9999)  # too old
    log(bob, NOW, 1000, 1000)
    gone.delete()

    totals = usage_totals(tenant_id=alice.tenant.pk, now=NOW)

    assert [
        (t.name, t.requests, t.prompt_tokens, t.completion_tokens, t.total_tokens) for t in totals
    ] == [
        ("other", 1, 300, 3, 303),
        ("default", 2, 20, 10, 30),
        ("(no key: ingestion, pages, deleted keys)", 1, 1, 1, 2),
        ("idle", 0, 0, 0, 0),
    ]
    assert {t.api_key_id for t in totals} == {alice.api_key.pk, other.pk, idle.pk, None}
