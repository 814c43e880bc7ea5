"""The admin dashboard's figures from the request logs: per hour over the last hours
(requests, errors, tokens, latency p50/p95) and the busiest tenants. One query each, in
PostgreSQL (percentile_cont), for the admin only."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db import connection
from django.utils import timezone

from apps.request_logs.models import RequestLog
from apps.tenants.models import Tenant

TABLE = RequestLog._meta.db_table
TENANTS = Tenant._meta.db_table


@dataclass(frozen=True)
class Hour:
    start: datetime
    requests: int = 0
    errors: int = 0
    tokens: int = 0
    p50_ms: float = 0.0
    p95_ms: float = 0.0


@dataclass(frozen=True)
class TenantRow:
    slug: str
    requests: int
    tokens: int
    errors: int


def _since(hours: int) -> datetime:
    now = timezone.now().replace(minute=0, second=0, microsecond=0)
    return now - timedelta(hours=hours - 1)


def hourly(*, hours: int = 24) -> list[Hour]:
    """Every hour of the window, oldest first (hours without requests included)."""
    since = _since(hours)
    sql = f"""
        SELECT date_trunc('hour', created_at) AS hour, count(*),
               count(*) FILTER (WHERE status_code >= 400),
               coalesce(sum(prompt_tokens + completion_tokens), 0),
               percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms),
               percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms)
        FROM {TABLE} WHERE created_at >= %s GROUP BY 1
    """
    with connection.cursor() as cursor:
        cursor.execute(sql, [since])
        rows = {row[0]: Hour(row[0], *row[1:4], float(row[4]), float(row[5])) for row in cursor}
    starts = [since + timedelta(hours=i) for i in range(hours)]
    return [rows.get(start, Hour(start)) for start in starts]


def top_tenants(*, hours: int = 24, limit: int = 10) -> list[TenantRow]:
    sql = f"""
        SELECT t.slug, count(*), coalesce(sum(l.prompt_tokens + l.completion_tokens), 0),
               count(*) FILTER (WHERE l.status_code >= 400)
        FROM {TABLE} l JOIN {TENANTS} t ON t.id = l.tenant_id
        WHERE l.created_at >= %s GROUP BY t.slug ORDER BY 2 DESC, 1 LIMIT %s
    """
    with connection.cursor() as cursor:
        cursor.execute(sql, [_since(hours), limit])
        return [TenantRow(*row) for row in cursor]
