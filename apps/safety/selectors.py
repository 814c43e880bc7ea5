"""Reading the audit trail."""

from __future__ import annotations

from datetime import date, datetime, timedelta

from django.db.models import Count, Q, QuerySet
from django.db.models.functions import TruncDate
from django.utils import timezone

from apps.safety.models import SafetyEvent


def event_list(
    *,
    tenant_id: int,
    stage: str | None = None,
    action: str | None = None,
    rule: str | None = None,
    search: str | None = None,
    since: datetime | None = None,
) -> QuerySet[SafetyEvent]:
    events = SafetyEvent.objects.filter(tenant_id=tenant_id).select_related("api_key")
    if stage:
        events = events.filter(stage=stage)
    if action:
        events = events.filter(action=action)
    if rule:
        events = events.filter(rule_name=rule)
    if since is not None:
        events = events.filter(created_at__gte=since)
    if search:
        events = events.filter(
            Q(excerpt__icontains=search)
            | Q(rule_name__icontains=search)
            | Q(detail__icontains=search)
        )
    return events.order_by("-created_at", "-pk")


def events_per_day_per_rule(
    *, queryset: QuerySet[SafetyEvent], days: int = 14
) -> tuple[list[date], dict[str, dict[date, int]]]:
    """(the last `days` days, oldest first; {rule name: {day: events}})."""
    today = timezone.localdate()
    first = today - timedelta(days=days - 1)
    rows = (
        queryset.filter(created_at__date__gte=first)
        .annotate(day=TruncDate("created_at"))
        .values("rule_name", "day")
        .annotate(n=Count("pk"))
    )
    per_rule: dict[str, dict[date, int]] = {}
    for row in rows:
        per_rule.setdefault(row["rule_name"], {})[row["day"]] = row["n"]
    return [first + timedelta(days=i) for i in range(days)], per_rule
