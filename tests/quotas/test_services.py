"""Reserve, settle, release and sweep token reservations; set quotas and rate limits."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from apps.quotas import services
from apps.quotas.models import Quota, QuotaWindow, Reservation
from apps.quotas.services import (
    QuotaExceeded,
    ReservationTicket,
    quota_release,
    quota_reserve,
    quota_set,
    quota_settle,
    rate_limit_set,
    reservations_release_stale,
)
from apps.tenants.services import api_key_create
from tests.conftest import TenantKey

pytestmark = pytest.mark.django_db

NOW = datetime(2026, 11, 22, 18, 30, tzinfo=UTC)


@pytest.fixture(autouse=True)
def _no_opportunistic_sweep(monkeypatch: pytest.MonkeyPatch) -> None:
    """Query counts below must not depend on when the per-process sweep last ran."""
    monkeypatch.setattr(services, "_last_sweep", float("inf"))


def reserve(owner: TenantKey, tokens: int, now: datetime = NOW, **kw: Any) -> ReservationTicket:
    return quota_reserve(
        tenant_id=owner.tenant.pk, api_key_id=owner.api_key.pk, tokens=tokens, now=now, **kw
    )


def window(quota: Quota, now: datetime = NOW) -> tuple[int, int]:
    """(used, reserved) of the quota's window containing `now`; (0, 0) if it has none."""
    from apps.quotas.periods import window_start

    row = QuotaWindow.objects.filter(
        quota=quota, window_start=window_start(quota.period, now)
    ).first()
    return (row.used_tokens, row.reserved_tokens) if row else (0, 0)


def all_reserved() -> int:
    return sum(QuotaWindow.objects.values_list("reserved_tokens", flat=True))


# --- reserve -------------------------------------------------------------------------


def test_it_reserves_nothing_and_writes_nothing_without_quotas(alice: TenantKey) -> None:
    with CaptureQueriesContext(connection) as ctx:
        ticket = reserve(alice, 500)

    assert ticket == ReservationTicket(reservation_id=None, tokens=500, states=[])
    assert len(ctx.captured_queries) == 1
    assert not QuotaWindow.objects.exists()
    assert not Reservation.objects.exists()


def test_it_reserves_tokens_in_the_current_window(alice: TenantKey) -> None:
    quota = quota_set(tenant=alice.tenant, tokens=1000, period="day")

    ticket = reserve(alice, 300)

    assert window(quota) == (0, 300)
    assert ticket.tokens == 300
    [state] = ticket.states
    assert (state.scope, state.period, state.limit, state.used, state.reserved) == (
        "tenant",
        "day",
        1000,
        0,
        300,
    )
    assert state.remaining == 700
    assert state.resets_at == datetime(2026, 11, 23, tzinfo=UTC)
    reservation = Reservation.objects.get(pk=ticket.reservation_id)
    assert reservation.tokens == 300
    assert reservation.window_ids == [QuotaWindow.objects.get().pk]


def test_it_reserves_in_a_few_queries(alice: TenantKey) -> None:
    quota_set(tenant=alice.tenant, tokens=1000, period="day")
    quota_set(tenant=alice.tenant, tokens=100, period="hour", api_key=alice.api_key)

    with CaptureQueriesContext(connection) as ctx:
        reserve(alice, 10)

    statements = [q["sql"] for q in ctx.captured_queries]
    # The quota lookup, then one round trip that reserves in every window at once (a
    # server-side function: row locks never wait on the gateway).
    assert len(statements) == 2
    assert statements[1].startswith("SELECT * FROM gateway_quota_reserve(")


def test_it_fills_a_quota_exactly_then_refuses(alice: TenantKey) -> None:
    quota = quota_set(tenant=alice.tenant, tokens=1000, period="day")
    reserve(alice, 600)
    reserve(alice, 400)

    with pytest.raises(QuotaExceeded) as exc:
        reserve(alice, 1)

    assert exc.value.state.remaining == 0
    assert exc.value.requested == 1
    assert window(quota) == (0, 1000)
    assert Reservation.objects.count() == 2


def test_it_refuses_more_than_the_limit_in_a_fresh_window(alice: TenantKey) -> None:
    quota = quota_set(tenant=alice.tenant, tokens=100, period="hour")

    with pytest.raises(QuotaExceeded) as exc:
        reserve(alice, 101)

    assert (exc.value.state.used, exc.value.state.reserved) == (0, 0)
    assert str(exc.value) == (
        "Token quota exceeded for tenant alice (hour): 100 tokens per hour, 100 left, "
        "101 requested; resets at 2026-11-22T19:00:00Z (in 30m0s)."
    )
    # The window may now exist, but the refused request holds nothing in it.
    assert [
        (w.used_tokens, w.reserved_tokens) for w in QuotaWindow.objects.filter(quota=quota)
    ] in (
        [],
        [(0, 0)],
    )


def test_it_accepts_a_zero_token_reservation(alice: TenantKey) -> None:
    quota_set(tenant=alice.tenant, tokens=10, period="day")

    ticket = reserve(alice, 0)

    assert ticket.reservation_id is not None


def test_it_refuses_negative_tokens(alice: TenantKey) -> None:
    with pytest.raises(ValueError, match="tokens"):
        reserve(alice, -1)


def test_it_starts_a_fresh_window_each_period(alice: TenantKey) -> None:
    quota = quota_set(tenant=alice.tenant, tokens=100, period="hour")
    last_moment = datetime(2026, 11, 22, 18, 59, 59, 999_999, tzinfo=UTC)
    reserve(alice, 100, now=last_moment)
    with pytest.raises(QuotaExceeded):
        reserve(alice, 1, now=last_moment)

    ticket = reserve(alice, 100, now=last_moment + timedelta(microseconds=1))

    assert ticket.states[0].resets_at == datetime(2026, 11, 22, 20, tzinfo=UTC)
    assert QuotaWindow.objects.filter(quota=quota).count() == 2


def test_it_keeps_one_window_forever_for_a_total_quota(alice: TenantKey) -> None:
    quota = quota_set(tenant=alice.tenant, tokens=100, period="total")
    reserve(alice, 60, now=datetime(2020, 1, 1, tzinfo=UTC))

    with pytest.raises(QuotaExceeded) as exc:
        reserve(alice, 60, now=datetime(2030, 1, 1, tzinfo=UTC))

    assert exc.value.state.resets_at is None
    assert QuotaWindow.objects.filter(quota=quota).count() == 1


# --- several quotas at once -----------------------------------------------------------


def test_it_reserves_in_every_applicable_quota(alice: TenantKey) -> None:
    day = quota_set(tenant=alice.tenant, tokens=1000, period="day")
    month = quota_set(tenant=alice.tenant, tokens=5000, period="month")
    own = quota_set(tenant=alice.tenant, tokens=200, period="hour", api_key=alice.api_key)
    other_key = api_key_create(tenant=alice.tenant, name="other").api_key
    theirs = quota_set(tenant=alice.tenant, tokens=1, period="hour", api_key=other_key)

    ticket = reserve(alice, 150)

    assert [window(q) for q in (day, month, own, theirs)] == [(0, 150), (0, 150), (0, 150), (0, 0)]
    assert {s.scope for s in ticket.states} == {"tenant", "key default"}
    assert len(Reservation.objects.get().window_ids) == 3


def test_it_needs_every_quota_to_hold_and_reserves_nothing_otherwise(alice: TenantKey) -> None:
    day = quota_set(tenant=alice.tenant, tokens=1000, period="day")
    own = quota_set(tenant=alice.tenant, tokens=200, period="hour", api_key=alice.api_key)
    reserve(alice, 150)

    with pytest.raises(QuotaExceeded) as exc:
        reserve(alice, 100)  # fits the day (850 left), not the key's hour (50 left)

    assert exc.value.state.quota_id == own.pk
    assert exc.value.state.remaining == 50
    assert [window(day), window(own)] == [(0, 150), (0, 150)]
    assert Reservation.objects.count() == 1


def test_it_reports_the_refusing_quota_that_resets_last(alice: TenantKey) -> None:
    quota_set(tenant=alice.tenant, tokens=100, period="hour")
    month = quota_set(tenant=alice.tenant, tokens=100, period="month", api_key=alice.api_key)
    reserve(alice, 100)

    with pytest.raises(QuotaExceeded) as exc:
        reserve(alice, 1)

    # Waiting for the hour to reset would not help: the month decides when to retry.
    assert exc.value.state.quota_id == month.pk
    assert "key default of tenant alice (month)" in str(exc.value)


def test_it_keeps_tenants_apart(alice: TenantKey, bob: TenantKey) -> None:
    quota_set(tenant=alice.tenant, tokens=100, period="day")
    reserve(alice, 100)

    ticket = reserve(bob, 1_000_000)

    assert ticket.reservation_id is None


def test_it_shares_a_tenant_quota_between_keys(alice: TenantKey) -> None:
    quota_set(tenant=alice.tenant, tokens=100, period="day")
    second = api_key_create(tenant=alice.tenant, name="second").api_key
    reserve(alice, 70)

    with pytest.raises(QuotaExceeded):
        quota_reserve(tenant_id=alice.tenant.pk, api_key_id=second.pk, tokens=31, now=NOW)


# --- settle and release ---------------------------------------------------------------


def test_it_settles_actual_usage_in_place_of_the_reservation(alice: TenantKey) -> None:
    quota = quota_set(tenant=alice.tenant, tokens=1000, period="day")
    ticket = reserve(alice, 300)

    states = quota_settle(ticket=ticket, actual_tokens=120)

    assert window(quota) == (120, 0)
    assert not Reservation.objects.exists()
    assert [(s.used, s.reserved, s.remaining) for s in states] == [(120, 0, 880)]


def test_it_charges_usage_above_the_reservation_in_full(alice: TenantKey) -> None:
    quota = quota_set(tenant=alice.tenant, tokens=1000, period="day")
    ticket = reserve(alice, 300)

    quota_settle(ticket=ticket, actual_tokens=1400)

    assert window(quota) == (1400, 0)
    with pytest.raises(QuotaExceeded) as exc:
        reserve(alice, 1)
    assert exc.value.state.remaining == 0


def test_it_settles_only_once(alice: TenantKey) -> None:
    quota = quota_set(tenant=alice.tenant, tokens=1000, period="day")
    ticket = reserve(alice, 300)
    quota_settle(ticket=ticket, actual_tokens=100)

    assert quota_settle(ticket=ticket, actual_tokens=100) == []
    quota_release(ticket=ticket)

    assert window(quota) == (100, 0)


def test_it_releases_a_reservation_without_charging(alice: TenantKey) -> None:
    quota = quota_set(tenant=alice.tenant, tokens=1000, period="day")
    ticket = reserve(alice, 300)

    quota_release(ticket=ticket)

    assert window(quota) == (0, 0)
    assert not Reservation.objects.exists()


def test_it_settles_a_ticket_without_reservation_as_a_no_op(alice: TenantKey) -> None:
    ticket = reserve(alice, 300)

    with CaptureQueriesContext(connection) as ctx:
        assert quota_settle(ticket=ticket, actual_tokens=5) == []

    assert ctx.captured_queries == []


def test_it_settles_into_the_window_that_was_reserved(alice: TenantKey) -> None:
    """A request that spans an hour boundary is charged to the hour it started in."""
    quota = quota_set(tenant=alice.tenant, tokens=1000, period="hour")
    ticket = reserve(alice, 300, now=datetime(2026, 11, 22, 18, 59, tzinfo=UTC))

    states = quota_settle(ticket=ticket, actual_tokens=250)

    assert window(quota, datetime(2026, 11, 22, 18, tzinfo=UTC)) == (250, 0)
    assert window(quota, datetime(2026, 11, 22, 19, tzinfo=UTC)) == (0, 0)
    assert states[0].resets_at == datetime(2026, 11, 22, 19, tzinfo=UTC)


def test_it_settles_what_is_left_when_a_quota_was_removed_meanwhile(alice: TenantKey) -> None:
    day = quota_set(tenant=alice.tenant, tokens=1000, period="day")
    hour = quota_set(tenant=alice.tenant, tokens=500, period="hour")
    ticket = reserve(alice, 300)
    quota_set(tenant=alice.tenant, tokens=0, period="hour")

    states = quota_settle(ticket=ticket, actual_tokens=10)

    assert [s.quota_id for s in states] == [day.pk]
    assert window(day) == (10, 0)
    assert not Quota.objects.filter(pk=hour.pk).exists()


def test_it_refuses_a_negative_actual_usage(alice: TenantKey) -> None:
    quota_set(tenant=alice.tenant, tokens=1000, period="day")
    ticket = reserve(alice, 300)

    with pytest.raises(ValueError, match="actual_tokens must be 0 or more"):
        quota_settle(ticket=ticket, actual_tokens=-1)

    assert all_reserved() == 300


# --- stale reservations ---------------------------------------------------------------


def test_it_releases_stale_reservations_and_keeps_fresh_ones(alice: TenantKey) -> None:
    quota = quota_set(tenant=alice.tenant, tokens=1000, period="day")
    stale = reserve(alice, 300)
    Reservation.objects.filter(pk=stale.reservation_id).update(
        created_at=timezone.now() - timedelta(seconds=901)
    )
    fresh = reserve(alice, 200)

    assert reservations_release_stale() == 1

    assert window(quota) == (0, 200)
    assert reservations_release_stale() == 0  # released once only
    assert window(quota) == (0, 200)
    open_ids = Reservation.objects.filter(released_at__isnull=True).values_list("pk", flat=True)
    assert list(open_ids) == [fresh.reservation_id]


def test_it_still_charges_a_request_that_outlived_the_ttl(alice: TenantKey) -> None:
    """Otherwise a stream longer than the TTL would be free."""
    quota = quota_set(tenant=alice.tenant, tokens=1000, period="day")
    slow = reserve(alice, 300)
    reservations_release_stale(now=timezone.now() + timedelta(hours=1))

    states = quota_settle(ticket=slow, actual_tokens=450)

    assert window(quota) == (450, 0)
    assert [(s.used, s.reserved) for s in states] == [(450, 0)]
    assert quota_settle(ticket=slow, actual_tokens=450) == []
    assert window(quota) == (450, 0)
    assert not Reservation.objects.exists()


def test_it_forgets_released_reservations_after_a_day(alice: TenantKey) -> None:
    quota = quota_set(tenant=alice.tenant, tokens=1000, period="day")
    lost = reserve(alice, 300)
    reservations_release_stale(now=timezone.now() + timedelta(hours=1))
    assert Reservation.objects.count() == 1

    reservations_release_stale(now=timezone.now() + timedelta(days=1, hours=2))

    assert not Reservation.objects.exists()
    assert quota_settle(ticket=lost, actual_tokens=300) == []
    assert window(quota) == (0, 0)


def test_it_reads_the_ttl_from_settings(alice: TenantKey, settings: Any) -> None:
    settings.QUOTA_RESERVATION_TTL_SECONDS = 10
    quota_set(tenant=alice.tenant, tokens=1000, period="day")
    reserve(alice, 300)

    assert reservations_release_stale(now=timezone.now() + timedelta(seconds=9)) == 0
    assert reservations_release_stale(now=timezone.now() + timedelta(seconds=11)) == 1
    assert all_reserved() == 0


def test_it_releases_many_stale_reservations_in_batches(
    alice: TenantKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(services, "SWEEP_BATCH_SIZE", 3)
    quota_set(tenant=alice.tenant, tokens=10_000, period="day")
    quota_set(tenant=alice.tenant, tokens=10_000, period="month", api_key=alice.api_key)
    for _ in range(7):
        reserve(alice, 10)

    assert reservations_release_stale(now=timezone.now() + timedelta(hours=1)) == 7

    assert all_reserved() == 0
    assert not Reservation.objects.filter(released_at__isnull=True).exists()


def test_it_sweeps_opportunistically_at_most_once_a_minute(
    alice: TenantKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    quota_set(tenant=alice.tenant, tokens=1000, period="day")
    stale = reserve(alice, 1000)
    Reservation.objects.filter(pk=stale.reservation_id).update(
        created_at=timezone.now() - timedelta(hours=1)
    )
    monkeypatch.setattr(services, "_last_sweep", float("-inf"))

    reserve(alice, 1000)  # fits only because the sweep released the stale reservation first

    assert Reservation.objects.filter(released_at__isnull=True).count() == 1
    Reservation.objects.update(created_at=timezone.now() - timedelta(hours=1))
    with pytest.raises(QuotaExceeded):
        reserve(alice, 1)  # the next sweep is a minute away


def test_it_keeps_serving_when_the_sweep_fails(
    alice: TenantKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    from django.db import DatabaseError

    def broken(**kwargs: Any) -> int:
        raise DatabaseError("boom")

    monkeypatch.setattr(services, "reservations_release_stale", broken)
    monkeypatch.setattr(services, "_last_sweep", float("-inf"))
    quota_set(tenant=alice.tenant, tokens=1000, period="day")

    assert reserve(alice, 10).reservation_id is not None


def test_it_leaves_a_deleted_keys_reservation_to_the_sweep(alice: TenantKey) -> None:
    tenant_wide = quota_set(tenant=alice.tenant, tokens=1000, period="day")
    reserve(alice, 300)

    alice.api_key.delete()

    assert window(tenant_wide) == (0, 300)
    assert reservations_release_stale(now=timezone.now() + timedelta(hours=1)) == 1
    assert window(tenant_wide) == (0, 0)


# --- quota_set -------------------------------------------------------------------------


def test_it_sets_replaces_and_removes_a_quota(alice: TenantKey) -> None:
    first = quota_set(tenant=alice.tenant, tokens=1000, period="day")
    reserve(alice, 400)

    second = quota_set(tenant=alice.tenant, tokens=500, period="day")

    assert second.pk == first.pk
    assert second.limit_tokens == 500
    assert window(second) == (0, 400)  # a new limit keeps what was already counted
    with pytest.raises(QuotaExceeded):
        reserve(alice, 101)

    assert quota_set(tenant=alice.tenant, tokens=0, period="day") is None
    assert not Quota.objects.exists()


def test_it_keeps_tenant_and_key_quotas_of_one_period_apart(alice: TenantKey) -> None:
    quota_set(tenant=alice.tenant, tokens=1000, period="day")
    quota_set(tenant=alice.tenant, tokens=100, period="day", api_key=alice.api_key)
    quota_set(tenant=alice.tenant, tokens=2000, period="day")

    assert set(Quota.objects.values_list("api_key_id", "limit_tokens")) == {
        (None, 2000),
        (alice.api_key.pk, 100),
    }


@pytest.mark.parametrize(
    ("tokens", "period", "message"),
    [(-1, "day", "0 or more"), (10, "week", "Unknown period"), (1.5, "day", "integer")],
)
def test_it_refuses_bad_quota_values(
    alice: TenantKey, tokens: Any, period: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        quota_set(tenant=alice.tenant, tokens=tokens, period=period)

    assert not Quota.objects.exists()


def test_it_refuses_a_key_of_another_tenant(alice: TenantKey, bob: TenantKey) -> None:
    with pytest.raises(ValueError, match="does not belong"):
        quota_set(tenant=alice.tenant, tokens=10, period="day", api_key=bob.api_key)

    assert not Quota.objects.exists()


def test_it_validates_the_key_of_a_quota_in_the_model(alice: TenantKey, bob: TenantKey) -> None:
    from django.core.exceptions import ValidationError

    quota = Quota(tenant=alice.tenant, api_key=bob.api_key, period="day", limit_tokens=1)

    with pytest.raises(ValidationError, match="another tenant"):
        quota.full_clean()


# --- rate_limit_set ---------------------------------------------------------------------


def test_it_sets_and_removes_rate_limits(alice: TenantKey) -> None:
    rate_limit_set(tenant=alice.tenant, rpm=60)
    rate_limit_set(tenant=alice.tenant, rpm=10, api_key=alice.api_key)
    alice.tenant.refresh_from_db()
    alice.api_key.refresh_from_db()
    assert (alice.tenant.requests_per_minute, alice.api_key.requests_per_minute) == (60, 10)

    rate_limit_set(tenant=alice.tenant, rpm=0)

    alice.tenant.refresh_from_db()
    assert alice.tenant.requests_per_minute is None


def test_it_refuses_bad_rate_limits(alice: TenantKey, bob: TenantKey) -> None:
    with pytest.raises(ValueError, match="0 or more"):
        rate_limit_set(tenant=alice.tenant, rpm=-5)
    with pytest.raises(ValueError, match="does not belong"):
        rate_limit_set(tenant=alice.tenant, rpm=5, api_key=bob.api_key)

    bob.api_key.refresh_from_db()
    assert bob.api_key.requests_per_minute is None


def test_it_settles_an_unknown_reservation_as_a_no_op(alice: TenantKey) -> None:
    ticket = ReservationTicket(reservation_id=uuid.uuid4(), tokens=5, states=[])

    assert quota_settle(ticket=ticket, actual_tokens=5) == []
