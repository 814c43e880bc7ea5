"""GET /api/usage: the calling tenant's quotas and usage, and nobody else's."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from apps.quotas.services import quota_reserve, quota_set, quota_settle, rate_limit_set
from apps.request_logs.models import RequestLog
from apps.tenants.services import api_key_create, api_key_revoke
from tests.conftest import TenantKey, make_tenant

pytestmark = pytest.mark.django_db

URL = "/api/usage"


def log(owner: TenantKey, prompt: int, completion: int, *, key=None, days_ago: int = 0) -> None:
    RequestLog.objects.create(
        tenant=owner.tenant,
        api_key=key or owner.api_key,
        created_at=timezone.now() - timedelta(days=days_ago),
        endpoint="chat.completions",
        status_code=200,
        prompt_tokens=prompt,
        completion_tokens=completion,
        latency_ms=1.0,
    )


def get(client: Client, owner: TenantKey | None = None, **headers: str):
    if owner is not None:
        headers.setdefault("HTTP_AUTHORIZATION", f"Bearer {owner.raw_key}")
    return client.get(URL, **headers)


def test_it_shows_the_callers_quotas_usage_and_rate_limits(
    client: Client, alice: TenantKey
) -> None:
    batch = api_key_create(tenant=alice.tenant, name="batch").api_key
    quota_set(tenant=alice.tenant, tokens=100_000, period="month")
    quota_set(tenant=alice.tenant, tokens=1_000, period="day", api_key=alice.api_key)
    quota_set(tenant=alice.tenant, tokens=50, period="total", api_key=batch)
    ticket = quota_reserve(tenant_id=alice.tenant.pk, api_key_id=alice.api_key.pk, tokens=300)
    quota_settle(ticket=ticket, actual_tokens=250)
    quota_reserve(tenant_id=alice.tenant.pk, api_key_id=alice.api_key.pk, tokens=100)
    rate_limit_set(tenant=alice.tenant, rpm=600)
    log(alice, 200, 50)
    log(alice, 70, 30, days_ago=2)
    log(alice, 5, 5, key=batch)

    response = get(client, alice)

    assert response.status_code == 200
    body = response.json()
    assert (body["object"], body["tenant"], body["api_key"], body["days"]) == (
        "usage",
        "alice",
        "default",
        30,
    )
    assert body["rate_limits"] == {
        "tenant_requests_per_minute": 600,
        "key_requests_per_minute": None,
    }
    quotas = body["quotas"]
    assert [(q["scope"], q["period"], q["applies_to_this_key"]) for q in quotas] == [
        ("key batch", "total", False),
        ("key default", "day", True),
        ("tenant", "month", True),
    ]
    day = quotas[1]
    assert {k: day[k] for k in ("limit", "used", "reserved", "remaining")} == {
        "limit": 1000,
        "used": 250,
        "reserved": 100,
        "remaining": 650,
    }
    assert day["resets_at"].endswith("T00:00:00Z")
    assert quotas[0]["resets_at"] is None
    days = body["usage_by_day"]
    assert len(days) == 30
    assert days[-1] == {
        "date": timezone.now().date().isoformat(),
        "prompt_tokens": 205,
        "completion_tokens": 55,
        "total_tokens": 260,
    }
    assert days[-3]["total_tokens"] == 100
    assert body["usage_by_key"] == [
        {
            "name": "default",
            "requests": 2,
            "prompt_tokens": 270,
            "completion_tokens": 80,
            "total_tokens": 350,
        },
        {
            "name": "batch",
            "requests": 1,
            "prompt_tokens": 5,
            "completion_tokens": 5,
            "total_tokens": 10,
        },
    ]


def test_it_shows_a_tenant_without_quotas_or_usage(client: Client, alice: TenantKey) -> None:
    body = get(client, alice).json()

    assert body["quotas"] == []
    assert sum(d["total_tokens"] for d in body["usage_by_day"]) == 0
    assert body["usage_by_key"][0]["requests"] == 0


def test_it_never_shows_another_tenants_usage(
    client: Client, alice: TenantKey, bob: TenantKey
) -> None:
    quota_set(tenant=alice.tenant, tokens=1000, period="day")
    quota_reserve(tenant_id=alice.tenant.pk, api_key_id=alice.api_key.pk, tokens=999)
    log(alice, 12_345, 678)
    api_key_create(tenant=alice.tenant, name="alice-secret-key-name")

    response = get(client, bob)

    body = response.json()
    assert body["tenant"] == "bob"
    assert body["quotas"] == []
    assert sum(d["total_tokens"] for d in body["usage_by_day"]) == 0
    assert [k["name"] for k in body["usage_by_key"]] == ["default"]
    assert "alice" not in response.content.decode()
    assert "12345" not in response.content.decode()


def test_it_answers_in_few_queries(client: Client, alice: TenantKey) -> None:
    quota_set(tenant=alice.tenant, tokens=1000, period="day")
    log(alice, 1, 1)
    with CaptureQueriesContext(connection) as one:
        get(client, alice)
    for i in range(5):
        key = api_key_create(tenant=alice.tenant, name=f"k{i}").api_key
        quota_set(tenant=alice.tenant, tokens=1000, period="hour", api_key=key)
        log(alice, 1, 1, key=key)

    with CaptureQueriesContext(connection) as many:
        get(client, alice)

    assert (
        len(many.captured_queries) == len(one.captured_queries) <= 8
    )  # + budgets, + spend per day


@pytest.mark.parametrize(
    ("authorization", "message"),
    [
        (None, "Missing API key"),
        ("Bearer sk-nope", "Incorrect API key"),
        ("Basic abc", "Bearer"),
    ],
)
def test_it_refuses_missing_and_bad_keys_in_openai_shape(
    client: Client, alice: TenantKey, authorization: str | None, message: str
) -> None:
    headers = {"HTTP_AUTHORIZATION": authorization} if authorization else {}

    response = get(client, **headers)

    assert response.status_code == 401
    error = response.json()["error"]
    assert message in error["message"]
    assert error["code"] == "invalid_api_key"


def test_it_refuses_a_revoked_key(client: Client, alice: TenantKey) -> None:
    api_key_revoke(api_key=alice.api_key)

    assert get(client, alice).status_code == 401


def test_it_refuses_an_inactive_tenant(client: Client) -> None:
    owner = make_tenant("dormant")
    owner.tenant.active = False
    owner.tenant.save()

    response = get(client, owner)

    assert response.status_code == 403
    assert response.json()["error"]["code"] == "tenant_inactive"


def test_it_only_answers_get(client: Client, alice: TenantKey) -> None:
    response = client.post(URL, {}, HTTP_AUTHORIZATION=f"Bearer {alice.raw_key}")

    assert response.status_code == 405
    assert "error" in response.json()
