"""Quota periods and their windows. Windows are calendar periods in UTC, so every gateway
process (whatever its local time zone) agrees on which window a request falls into."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from django.db import models


class Period(models.TextChoices):
    HOUR = "hour", "hour"
    DAY = "day", "day"
    MONTH = "month", "month"
    TOTAL = "total", "total"


# A "total" quota has a single window that never ends; it starts at a fixed epoch.
TOTAL_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def window_start(period: str, now: datetime) -> datetime:
    """The UTC start of the window of `period` that contains `now`."""
    now = now.astimezone(UTC)
    if period == Period.HOUR:
        return now.replace(minute=0, second=0, microsecond=0)
    if period == Period.DAY:
        return now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == Period.MONTH:
        return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    if period == Period.TOTAL:
        return TOTAL_EPOCH
    raise ValueError(f"Unknown quota period {period!r}.")


def window_end(period: str, start: datetime) -> datetime | None:
    """When the window starting at `start` ends (its quota resets); None for total."""
    if period == Period.HOUR:
        return start + timedelta(hours=1)
    if period == Period.DAY:
        return start + timedelta(days=1)
    if period == Period.MONTH:
        if start.month == 12:
            return start.replace(year=start.year + 1, month=1)
        return start.replace(month=start.month + 1)
    if period == Period.TOTAL:
        return None
    raise ValueError(f"Unknown quota period {period!r}.")


def resets_at(period: str, now: datetime) -> datetime | None:
    return window_end(period, window_start(period, now))
