"""The admin dashboard: charts of requests, tokens, latency and errors per hour, and the
top tenants, from the request logs."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission
from django.utils import timezone

from apps.request_logs.models import RequestLog

pytestmark = pytest.mark.django_db

URL = "/admin/request_logs/requestlog/dashboard/"


def log(key, *, hours_ago: int = 0, status: int = 200, tokens: int = 10, latency: float = 100):
    RequestLog.objects.create(
        tenant=key.tenant, endpoint="chat.completions", status_code=status, latency_ms=latency,
        prompt_tokens=tokens // 2, completion_tokens=tokens - tokens // 2,
        created_at=timezone.now() - timedelta(hours=hours_ago),
    )  # fmt: skip


def bar_titles(html: str, chart: str) -> list[str]:
    svg = re.search(rf'<svg[^>]*id="chart-{chart}".*?</svg>', html, re.S).group(0)
    return re.findall(r"<title>([^<]*)</title>", svg)


def test_it_charts_the_last_24_hours_and_the_top_tenants(admin_client, alice, bob):
    for latency in (100, 200, 300, 400, 1000):
        log(alice, latency=latency)
    log(alice, hours_ago=3, status=500, tokens=0)
    log(bob, hours_ago=1, tokens=100)
    log(bob, hours_ago=30)  # outside the window
    response = admin_client.get(URL)
    assert response.status_code == 200
    html = response.content.decode()
    assert "<strong>7</strong> requests" in html
    assert "<strong>1</strong> errors" in html
    requests = bar_titles(html, "requests")
    assert len(requests) == 24
    assert requests[-1].endswith(": 5 requests")
    assert requests[-2].endswith(": 1 requests")
    assert requests[-4].endswith(": 1 requests")
    assert bar_titles(html, "tokens")[-2].endswith(": 100 tokens")
    assert bar_titles(html, "errors")[-4].endswith(": 1 errors")
    latency = response.context["charts"][2]
    assert [line.name for line in latency.lines] == ["p50", "p95"]
    hours = response.context["charts"][0]
    assert not hours.empty
    rows = [(t.slug, t.requests, t.tokens, t.errors) for t in response.context["tenants"]]
    assert rows == [("alice", 6, 50, 1), ("bob", 1, 100, 0)]


def test_it_computes_latency_percentiles_per_hour(admin_client, alice):
    for latency in (100, 200, 300, 400, 1000):
        log(alice, latency=latency)
    from apps.request_logs.dashboard import hourly

    last = hourly(hours=24)[-1]
    assert (last.requests, last.p50_ms) == (5, 300)
    assert last.p95_ms == pytest.approx(880)


def test_it_is_linked_from_the_request_logs_and_needs_the_view_permission(
    admin_client, client, django_user_model
):
    assert (
        'id="dashboard-link"'
        in admin_client.get("/admin/request_logs/requestlog/").content.decode()
    )
    assert client.get(URL).status_code == 302  # to the login page
    staff = django_user_model.objects.create_user("op", password="pw-123456789", is_staff=True)
    client.force_login(staff)
    assert client.get(URL).status_code == 403
    staff.user_permissions.add(Permission.objects.get(codename="view_requestlog"))
    assert client.get(URL).status_code == 200
