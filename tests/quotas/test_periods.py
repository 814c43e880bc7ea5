"""Quota windows (UTC calendar periods) and the wording of quota errors."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from apps.quotas.periods import TOTAL_EPOCH, Period, resets_at, window_end, window_start
from apps.quotas.state import QuotaExceeded, QuotaState, human_duration

NOW = datetime(2026, 11, 22, 18, 56, 59, 999_999, tzinfo=UTC)


@pytest.mark.parametrize(
    ("period", "start", "end"),
    [
        ("hour", datetime(2026, 11, 22, 18, tzinfo=UTC), datetime(2026, 11, 22, 19, tzinfo=UTC)),
        ("day", datetime(2026, 11, 22, tzinfo=UTC), datetime(2026, 11, 23, tzinfo=UTC)),
        ("month", datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC)),
        ("total", TOTAL_EPOCH, None),
    ],
)
def test_it_computes_the_window_around_now(
    period: str, start: datetime, end: datetime | None
) -> None:
    assert window_start(period, NOW) == start
    assert window_end(period, start) == end
    assert resets_at(period, NOW) == end


def test_it_starts_a_new_window_exactly_at_the_boundary() -> None:
    boundary = datetime(2026, 11, 23, tzinfo=UTC)

    assert window_start("day", boundary - timedelta(microseconds=1)) == boundary - timedelta(days=1)
    assert window_start("day", boundary) == boundary
    assert window_start("hour", boundary) == boundary


def test_it_rolls_december_over_to_january() -> None:
    december = datetime(2026, 12, 31, 23, 59, tzinfo=UTC)

    assert window_start("month", december) == datetime(2026, 12, 1, tzinfo=UTC)
    assert resets_at("month", december) == datetime(2027, 1, 1, tzinfo=UTC)


def test_it_uses_utc_windows_whatever_the_time_zone_of_now() -> None:
    # 01:30 in UTC+2 is still the previous day in UTC.
    local = datetime(2026, 11, 23, 1, 30, tzinfo=timezone(timedelta(hours=2)))

    assert window_start("day", local) == datetime(2026, 11, 22, tzinfo=UTC)


def test_it_refuses_an_unknown_period() -> None:
    with pytest.raises(ValueError, match="week"):
        window_start("week", NOW)


def test_it_lists_the_four_periods() -> None:
    assert Period.values == ["hour", "day", "month", "total"]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (45, "45s"), (750, "12m30s"), (18180, "5h3m"), (3 * 86400 + 7200, "3d2h")],
)
def test_it_writes_durations_with_two_units_at_most(seconds: float, text: str) -> None:
    assert human_duration(seconds) == text


def state(**overrides: object) -> QuotaState:
    values = {
        "quota_id": 1,
        "scope": "tenant",
        "period": "day",
        "limit": 1000,
        "used": 800,
        "reserved": 80,
        "resets_at": datetime(2026, 11, 23, tzinfo=UTC),
    }
    return QuotaState(**{**values, **overrides})


def test_it_says_which_quota_how_much_is_left_and_when_it_resets() -> None:
    now = datetime(2026, 11, 22, 18, 57, tzinfo=UTC)

    error = QuotaExceeded(state=state(), requested=300, tenant_slug="alice", now=now)

    assert str(error) == (
        "Token quota exceeded for tenant alice (day): 1,000 tokens per day, 120 left, "
        "300 requested; resets at 2026-11-23T00:00:00Z (in 5h3m)."
    )
    assert error.retry_after_seconds == 5 * 3600 + 3 * 60


def test_it_names_the_key_and_says_a_total_quota_never_resets() -> None:
    error = QuotaExceeded(
        state=state(scope="key backend", period="total", resets_at=None, used=1000, reserved=0),
        requested=5,
        tenant_slug="alice",
    )

    assert str(error) == (
        "Token quota exceeded for key backend of tenant alice (total): "
        "1,000 tokens in total, 0 left, 5 requested; it never resets."
    )
    assert error.retry_after_seconds is None


def test_it_never_reports_negative_remaining_tokens() -> None:
    # Usage may exceed the limit: a request is charged what the engine really produced.
    assert state(used=1200, reserved=0).remaining == 0


def test_it_turns_a_refusal_into_openais_429_insufficient_quota() -> None:
    from apps.quotas.errors import quota_exceeded_error

    now = datetime(2026, 11, 22, 23, 59, 30, tzinfo=UTC)
    error = quota_exceeded_error(
        QuotaExceeded(state=state(), requested=300, tenant_slug="alice", now=now)
    )

    assert (error.status, error.type, error.code) == (
        429,
        "insufficient_quota",
        "insufficient_quota",
    )
    assert error.message.startswith("Token quota exceeded for tenant alice (day)")
    assert error.headers == [(b"retry-after", b"30")]


def test_it_sends_no_retry_after_for_a_total_quota() -> None:
    from apps.quotas.errors import quota_exceeded_error

    exceeded = QuotaExceeded(
        state=state(period="total", resets_at=None), requested=1, tenant_slug="alice"
    )

    assert quota_exceeded_error(exceeded).headers == []
