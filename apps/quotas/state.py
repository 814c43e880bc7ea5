"""Value objects shared by services, selectors, views and the /v1 pipeline."""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from django.utils import timezone

from apps.quotas.periods import Period


@dataclass(frozen=True)
class QuotaState:
    """One quota's current window, as seen at some moment."""

    quota_id: int
    scope: str  # "tenant" or "key <name>"
    period: str
    limit: int
    used: int
    reserved: int
    resets_at: datetime | None  # None: a total quota never resets

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.used - self.reserved)

    @property
    def fraction_used(self) -> float:
        """Share of the limit used or reserved, 0..1 (for bars)."""
        if self.limit <= 0:
            return 1.0
        return min(1.0, (self.used + self.reserved) / self.limit)


@dataclass(frozen=True)
class ReservationTicket:
    """What quota_reserve hands the pipeline; give it back to quota_settle/quota_release."""

    reservation_id: uuid.UUID | None  # None: no quota applies, or held in `lease`
    tokens: int
    states: list[QuotaState] = field(default_factory=list)
    lease: Any = None  # apps.quotas.leases.LeaseHold: held in this process's leases


def iso_utc(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def human_duration(seconds: float) -> str:
    """Two units at most: 3d4h, 5h3m, 12m30s, 45s."""
    total = max(0, math.ceil(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes}m"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def describe_limit(state: QuotaState) -> str:
    if state.period == Period.TOTAL:
        return f"{state.limit:,} tokens in total"
    return f"{state.limit:,} tokens per {state.period}"


def describe_reset(state: QuotaState, *, now: datetime | None = None) -> str:
    if state.resets_at is None:
        return "it never resets"
    now = now or timezone.now()
    in_ = human_duration((state.resets_at - now).total_seconds())
    return f"resets at {iso_utc(state.resets_at)} (in {in_})"


class QuotaExceeded(Exception):
    """A reservation did not fit in `state` (nothing was reserved anywhere)."""

    def __init__(
        self, *, state: QuotaState, requested: int, tenant_slug: str, now: datetime | None = None
    ) -> None:
        self.state = state
        self.requested = requested
        self.tenant_slug = tenant_slug
        self.now = now or timezone.now()
        super().__init__(self.message)

    @property
    def subject(self) -> str:
        if self.state.scope == "tenant":
            return f"tenant {self.tenant_slug}"
        return f"{self.state.scope} of tenant {self.tenant_slug}"

    @property
    def message(self) -> str:
        state = self.state
        return (
            f"Token quota exceeded for {self.subject} ({state.period}): "
            f"{describe_limit(state)}, {state.remaining:,} left, {self.requested:,} requested; "
            f"{describe_reset(state, now=self.now)}."
        )

    @property
    def retry_after_seconds(self) -> int | None:
        """Seconds until the window resets (for a Retry-After header); None for total."""
        if self.state.resets_at is None:
            return None
        return max(1, math.ceil((self.state.resets_at - self.now).total_seconds()))
