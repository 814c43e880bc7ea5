"""The cache policies page in the admin, with each tenant's cache figures."""

from __future__ import annotations

import pytest

from apps.cache.models import CachePolicy
from apps.request_logs.models import RequestLog

pytestmark = pytest.mark.django_db


def log(tenant, status: str, saved: int = 0) -> None:
    RequestLog.objects.create(
        tenant=tenant, endpoint="chat.completions", status_code=200, latency_ms=1,
        cache_status=status, cache_saved_tokens=saved,
    )  # fmt: skip


def test_it_lists_policies_and_each_tenants_figures(admin_client, alice, bob):
    CachePolicy.objects.create(tenant=alice.tenant, ttl_seconds=120)
    log(alice.tenant, "hit", saved=40)
    log(alice.tenant, "hit", saved=2)
    log(alice.tenant, "miss")
    response = admin_client.get("/admin/response_cache/cachepolicy/")
    assert response.status_code == 200
    html = response.content.decode()
    assert "alice / every model: 120 s" in html
    (row,) = response.context["cache_rows"]
    tenant, stats = row
    assert tenant == alice.tenant
    assert (stats.hits, stats.misses, stats.saved_tokens) == (2, 1, 42)
    assert "67 %" in html  # hit rate


def test_a_policy_needs_a_tenant_or_a_model(admin_client):
    response = admin_client.post("/admin/response_cache/cachepolicy/add/", {"ttl_seconds": 10})
    assert response.status_code == 200
    assert "Pick a tenant, a model, or both" in response.content.decode()
    assert not CachePolicy.objects.exists()
