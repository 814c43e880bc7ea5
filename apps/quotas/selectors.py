"""Reads: quota states (live windows) and token usage from request logs."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import NamedTuple

from django.db.models import Case, Count, OuterRef, Q, QuerySet, Subquery, Sum, Value, When
from django.db.models.functions import Coalesce, TruncDate
from django.utils import timezone

from apps.quotas.models import Quota, QuotaWindow, Unit
from apps.quotas.periods import Period, window_end, window_start
from apps.quotas.state import QuotaState
from apps.request_logs.models import RequestLog
from apps.tenants.models import ApiKey

USAGE_DAYS = 30


def quotas_with_current_window(queryset: QuerySet[Quota], *, now: datetime) -> QuerySet[Quota]:
    """Annotate each quota with its current window's start, used and reserved tokens
    (0 when the window has no row yet), in the same query."""
    current_start = Case(
        *[When(period=period, then=Value(window_start(period, now))) for period in Period.values]
    )
    window = QuotaWindow.objects.filter(
        quota=OuterRef("pk"), window_start=OuterRef("current_start")
    )
    return queryset.annotate(
        current_start=current_start,
        current_used=Coalesce(Subquery(window.values("used_tokens")[:1]), 0),
        current_reserved=Coalesce(Subquery(window.values("reserved_tokens")[:1]), 0),
    )


def quota_state(quota: Quota) -> QuotaState:
    """The state of a quota annotated by quotas_with_current_window (api_key loaded)."""
    return QuotaState(
        quota_id=quota.pk,
        scope=quota.scope,
        period=quota.period,
        limit=quota.limit_tokens,
        used=quota.current_used,
        reserved=quota.current_reserved,
        resets_at=window_end(quota.period, quota.current_start),
    )


def tightest_first(states: list[QuotaState]) -> list[QuotaState]:
    return sorted(states, key=lambda s: (s.remaining, -s.fraction_used, s.quota_id))


def applicable_quotas(
    *, tenant_id: int, api_key_id: int | None, unit: str = Unit.TOKENS
) -> QuerySet[Quota]:
    """Quotas (or, unit=cost, budgets) that a request with this key must fit in: the
    tenant-wide ones and the key's. Without a key: every one of the tenant (overviews)."""
    quotas = Quota.objects.filter(tenant_id=tenant_id, unit=unit)
    if api_key_id is not None:
        quotas = quotas.filter(Q(api_key__isnull=True) | Q(api_key_id=api_key_id))
    return quotas


def quota_states(
    *,
    tenant_id: int,
    api_key_id: int | None = None,
    now: datetime | None = None,
    unit: str = Unit.TOKENS,
) -> list[QuotaState]:
    """Current states, the tightest (least remaining) first. One query."""
    quotas = applicable_quotas(tenant_id=tenant_id, api_key_id=api_key_id, unit=unit)
    quotas = quotas.select_related("api_key")
    quotas = quotas_with_current_window(quotas, now=now or timezone.now())
    return tightest_first([quota_state(quota) for quota in quotas])


class DayUsage(NamedTuple):
    day: date
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class KeyUsage:
    api_key_id: int | None  # None: requests of keys deleted since
    name: str
    requests: int
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def usage_since(*, days: int, now: datetime | None = None) -> datetime:
    """Midnight UTC starting the last `days` days (today included)."""
    today = (now or timezone.now()).astimezone(UTC).date()
    return datetime.combine(today - timedelta(days=days - 1), time.min, tzinfo=UTC)


def _logs(*, tenant_id: int, api_key_id: int | None, since: datetime) -> QuerySet[RequestLog]:
    logs = RequestLog.objects.filter(tenant_id=tenant_id, created_at__gte=since)
    if api_key_id is not None:
        logs = logs.filter(api_key_id=api_key_id)
    return logs.order_by()


def usage_by_day(
    *,
    tenant_id: int,
    api_key_id: int | None = None,
    days: int = USAGE_DAYS,
    now: datetime | None = None,
) -> list[DayUsage]:
    """Tokens per UTC day over the last `days` days, oldest first, days without use as 0."""
    since = usage_since(days=days, now=now)
    rows = (
        _logs(tenant_id=tenant_id, api_key_id=api_key_id, since=since)
        .annotate(day=TruncDate("created_at", tzinfo=UTC))
        .values("day")
        .annotate(prompt=Sum("prompt_tokens"), completion=Sum("completion_tokens"))
    )
    by_day = {row["day"]: (row["prompt"], row["completion"]) for row in rows}
    first = since.date()
    return [
        DayUsage(day, *by_day.get(day, (0, 0)))
        for day in (first + timedelta(days=i) for i in range(days))
    ]


def usage_totals(
    *,
    tenant_id: int,
    api_key_id: int | None = None,
    days: int = USAGE_DAYS,
    now: datetime | None = None,
) -> list[KeyUsage]:
    """Requests and tokens per API key over the last `days` days, the heaviest first.
    Keys without requests are listed too (with zeros). Two queries."""
    since = usage_since(days=days, now=now)
    rows = (
        _logs(tenant_id=tenant_id, api_key_id=api_key_id, since=since)
        .values("api_key_id")
        .annotate(
            requests=Count("id"),
            prompt=Sum("prompt_tokens"),
            completion=Sum("completion_tokens"),
        )
    )
    by_key = {row["api_key_id"]: row for row in rows}
    keys = ApiKey.objects.filter(tenant_id=tenant_id)
    if api_key_id is not None:
        keys = keys.filter(pk=api_key_id)
    names: dict[int | None, str] = dict(keys.values_list("pk", "name"))
    if None in by_key:
        # Calls made without a key: a document's ingestion, a member's search on the
        # pages (apps/core/usage.py), and the requests of keys deleted since.
        names[None] = "(no key: ingestion, pages, deleted keys)"
    totals = [_key_usage(key_id, name, by_key.get(key_id)) for key_id, name in names.items()]
    return sorted(totals, key=lambda usage: (-usage.total_tokens, usage.name))


def _key_usage(key_id: int | None, name: str, row: dict | None) -> KeyUsage:
    row = row or {}
    return KeyUsage(
        api_key_id=key_id,
        name=name,
        requests=row.get("requests", 0),
        prompt_tokens=row.get("prompt", 0),
        completion_tokens=row.get("completion", 0),
    )


@dataclass(frozen=True)
class KindUsage:
    """Requests and tokens of one kind of call: a /v1 endpoint ("chat.completions"), or
    an engine call made for the tenant ("embeddings (ingestion)", "safety classifier")."""

    kind: str
    requests: int
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def usage_by_kind(
    *,
    tenant_id: int,
    api_key_id: int | None = None,
    days: int = USAGE_DAYS,
    now: datetime | None = None,
) -> list[KindUsage]:
    """Requests and tokens per kind of call over the last `days` days, the heaviest
    first. One query."""
    rows = (
        _logs(tenant_id=tenant_id, api_key_id=api_key_id, since=usage_since(days=days, now=now))
        .values("endpoint")
        .annotate(
            requests=Count("id"), prompt=Sum("prompt_tokens"), completion=Sum("completion_tokens")
        )
    )
    kinds = [
        KindUsage(row["endpoint"], row["requests"], row["prompt"], row["completion"])
        for row in rows
    ]
    return sorted(kinds, key=lambda usage: (-usage.total_tokens, usage.kind))


class DaySpend(NamedTuple):
    day: date
    api_key: str
    model: str
    requests: int
    cost: Decimal


def spend_by_day(
    *,
    tenant_id: int,
    api_key_id: int | None = None,
    days: int = USAGE_DAYS,
    now: datetime | None = None,
) -> list[DaySpend]:
    """Money spent per UTC day, key and model over the last `days` days (days with
    priced requests only), oldest first. One query."""
    rows = (
        _logs(tenant_id=tenant_id, api_key_id=api_key_id, since=usage_since(days=days, now=now))
        .filter(cost__isnull=False)
        .annotate(day=TruncDate("created_at", tzinfo=UTC))
        .values("day", "api_key__name", "model")
        .annotate(requests=Count("id"), spent=Sum("cost"))
        .order_by("day", "api_key__name", "model")
    )
    return [
        DaySpend(r["day"], r["api_key__name"] or "(deleted key)", r["model"], r["requests"],
                 r["spent"].normalize())
        for r in rows
    ]  # fmt: skip


def spend_per_day(spend: list[DaySpend], *, days: int = USAGE_DAYS, now=None) -> list[tuple]:
    """(day, cost) for each of the last `days` days, 0 where nothing was spent."""
    totals: dict[date, Decimal] = {}
    for row in spend:
        totals[row.day] = totals.get(row.day, Decimal(0)) + row.cost
    first = usage_since(days=days, now=now).date()
    return [
        (day, totals.get(day, Decimal(0)))
        for day in (first + timedelta(days=i) for i in range(days))
    ]
