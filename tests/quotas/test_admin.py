"""Admin pages: quotas with their live state, windows, reservations, and the usage page."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import Permission, User
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from apps.quotas.models import Quota, QuotaWindow, Reservation, Usage
from apps.quotas.services import quota_reserve, quota_set, quota_settle
from apps.request_logs.models import RequestLog
from apps.tenants.services import api_key_create
from tests.conftest import TenantKey

pytestmark = pytest.mark.django_db


def url(model: type, view: str, *args: Any) -> str:
    return reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_{view}", args=args)


def usage_page(tenant_id: int) -> str:
    return reverse("admin:quotas_usage_tenant", args=[tenant_id])


def log(owner: TenantKey, prompt: int, completion: int, *, days_ago: int = 0, key=None) -> None:
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


def queries(client: Client, page: str) -> int:
    with CaptureQueriesContext(connection) as ctx:
        assert client.get(page).status_code == 200
    return len(ctx.captured_queries)


@pytest.fixture
def busy(alice: TenantKey) -> TenantKey:
    """Alice with quotas in use and request logs."""
    quota_set(tenant=alice.tenant, tokens=100_000, period="day")
    quota_set(tenant=alice.tenant, tokens=5_000, period="hour", api_key=alice.api_key)
    ticket = quota_reserve(tenant_id=alice.tenant.pk, api_key_id=alice.api_key.pk, tokens=3000)
    quota_settle(ticket=ticket, actual_tokens=1234)
    quota_reserve(tenant_id=alice.tenant.pk, api_key_id=alice.api_key.pk, tokens=500)
    log(alice, 1000, 234)
    log(alice, 40_000, 2_000, days_ago=3)
    return alice


# --- every page renders --------------------------------------------------------------


@pytest.mark.parametrize("model", [Quota, QuotaWindow, Reservation, Usage])
def test_it_renders_changelists_and_searches(admin_client: Client, busy: TenantKey, model) -> None:
    assert admin_client.get(url(model, "changelist")).status_code == 200
    assert admin_client.get(url(model, "changelist"), {"q": "alice"}).status_code == 200


def test_it_renders_the_quota_add_and_change_pages(admin_client: Client, busy: TenantKey) -> None:
    quota = Quota.objects.get(api_key__isnull=False)

    assert admin_client.get(url(Quota, "add")).status_code == 200
    content = admin_client.get(url(Quota, "change", quota.pk)).content.decode()

    assert "1,234" in content
    assert "500" in content
    assert "3,266" in content  # remaining


def test_it_lists_quotas_with_their_live_state(admin_client: Client, busy: TenantKey) -> None:
    content = admin_client.get(url(Quota, "changelist")).content.decode()

    assert '<td class="field-used">1,234</td>' in content
    assert '<td class="field-reserved">500</td>' in content
    assert '<td class="field-remaining">98,266</td>' in content
    assert '<td class="field-remaining">3,266</td>' in content
    assert "resets at " in content
    assert usage_page(busy.tenant.pk) in content


@pytest.mark.parametrize("scope", ["tenant", "key"])
def test_it_filters_quotas_by_scope(admin_client: Client, busy: TenantKey, scope: str) -> None:
    response = admin_client.get(url(Quota, "changelist"), {"scope": scope, "period": "day"})

    rows = response.context["cl"].result_list
    assert [q.api_key_id is None for q in rows] == ([True] if scope == "tenant" else [])


def test_it_keeps_quota_changelist_queries_constant(
    admin_client: Client, alice: TenantKey, bob: TenantKey
) -> None:
    quota_set(tenant=alice.tenant, tokens=10, period="day")
    one = queries(admin_client, url(Quota, "changelist"))
    for owner in (alice, bob):
        for period in ("hour", "month", "total"):
            quota_set(tenant=owner.tenant, tokens=10, period=period, api_key=owner.api_key)

    assert queries(admin_client, url(Quota, "changelist")) <= one


def test_it_adds_a_quota_in_the_admin(admin_client: Client, alice: TenantKey) -> None:
    response = admin_client.post(
        url(Quota, "add"),
        {
            "tenant": alice.tenant.pk,
            "api_key": alice.api_key.pk,
            "period": "day",
            "limit_tokens": 500,
        },
    )

    assert response.status_code == 302
    assert Quota.objects.get().limit_tokens == 500


def test_it_refuses_a_key_of_another_tenant_in_the_admin(
    admin_client: Client, alice: TenantKey, bob: TenantKey
) -> None:
    response = admin_client.post(
        url(Quota, "add"),
        {
            "tenant": alice.tenant.pk,
            "api_key": bob.api_key.pk,
            "period": "day",
            "limit_tokens": 500,
        },
    )

    assert response.status_code == 200
    assert "This API key belongs to another tenant." in response.content.decode()
    assert not Quota.objects.exists()


def test_it_refuses_a_second_tenant_wide_quota_for_a_period(
    admin_client: Client, alice: TenantKey
) -> None:
    quota_set(tenant=alice.tenant, tokens=10, period="day")

    response = admin_client.post(
        url(Quota, "add"), {"tenant": alice.tenant.pk, "period": "day", "limit_tokens": 500}
    )

    assert response.status_code == 200
    assert "already has a quota for this period" in response.content.decode()
    assert Quota.objects.get().limit_tokens == 10


def test_it_changes_only_the_limit_of_a_quota(admin_client: Client, busy: TenantKey) -> None:
    quota = Quota.objects.get(api_key__isnull=True)

    response = admin_client.post(
        url(Quota, "change", quota.pk), {"limit_tokens": 7, "period": "hour", "tenant": 999}
    )

    assert response.status_code == 302
    quota.refresh_from_db()
    assert (quota.limit_tokens, quota.period, quota.tenant_id) == (7, "day", busy.tenant.pk)


@pytest.mark.parametrize("model", [QuotaWindow, Reservation])
def test_it_keeps_windows_and_reservations_read_only(
    admin_client: Client, busy: TenantKey, model: type
) -> None:
    obj = model.objects.first()

    assert admin_client.get(url(model, "add")).status_code == 403
    assert admin_client.get(url(model, "change", obj.pk)).status_code == 200
    assert admin_client.post(url(model, "delete", obj.pk), {"post": "yes"}).status_code == 403
    assert model.objects.filter(pk=obj.pk).exists()


# --- usage pages ---------------------------------------------------------------------


def test_it_lists_tenants_with_links_to_their_usage(
    admin_client: Client, busy: TenantKey, bob: TenantKey
) -> None:
    content = admin_client.get(url(Usage, "changelist")).content.decode()

    assert usage_page(busy.tenant.pk) in content
    assert usage_page(bob.tenant.pk) in content
    assert '<td class="field-tokens_last_30_days">43,234</td>' in content
    assert "Usage by tenant" in admin_client.get(reverse("admin:index")).content.decode()


def test_it_keeps_the_usage_list_queries_constant(admin_client: Client, alice: TenantKey) -> None:
    one = queries(admin_client, url(Usage, "changelist"))
    from tests.conftest import make_tenant

    for slug in ("t1", "t2", "t3"):
        owner = make_tenant(slug)
        log(owner, 1, 1)

    assert queries(admin_client, url(Usage, "changelist")) <= one


def test_it_renders_the_usage_page(admin_client: Client, busy: TenantKey) -> None:
    other = api_key_create(tenant=busy.tenant, name="batch").api_key
    log(busy, 10, 20, key=other)

    response = admin_client.get(usage_page(busy.tenant.pk))

    assert response.status_code == 200
    content = response.content.decode()
    svg = re.search(r'<svg class="usage-chart".*?</svg>', content, re.S).group(0)
    assert svg.count('<rect class="prompt"') == 30
    assert svg.count('<rect class="completion"') == 30
    assert "40,000 prompt + 2,000 completion tokens" in svg  # a bar's hover title
    assert "<script" not in content.split('id="content-main"')[1]  # no JS in the page body
    keys = re.search(r'<table id="usage-keys">.*?</table>', content, re.S).group(0)
    assert keys.index("default") < keys.index("batch")  # the heaviest first
    assert "43,234" in keys
    quotas = re.search(r'<table id="usage-quotas">.*?</table>', content, re.S).group(0)
    assert 'class="quota-bar"' in quotas
    assert "key default" in quotas
    assert "resets at" in quotas
    assert 'style="width: 24.7%"' in quotas  # 1,234 of 5,000 used ...
    assert 'style="width: 10.0%"' in quotas  # ... and 500 reserved


def chart_of(content: str) -> str:
    return re.search(r'<svg class="usage-chart".*?</svg>', content, re.S).group(0)


def test_it_shows_the_usage_of_one_api_key(admin_client: Client, busy: TenantKey) -> None:
    batch = api_key_create(tenant=busy.tenant, name="batch").api_key
    log(busy, 10, 20, key=batch)
    log(busy, 7, 3, days_ago=3, key=batch)
    quota_set(tenant=busy.tenant, tokens=900, period="month", api_key=batch)

    whole = admin_client.get(usage_page(busy.tenant.pk)).content.decode()
    content = admin_client.get(usage_page(busy.tenant.pk), {"key": batch.pk}).content.decode()

    assert "1,010 prompt + 254 completion tokens" in chart_of(whole)  # both keys today
    svg = chart_of(content)
    assert svg.count('<rect class="prompt"') == 30
    assert "10 prompt + 20 completion tokens" in svg  # today: batch alone
    assert "7 prompt + 3 completion tokens" in svg  # three days ago
    assert "1,000 prompt" not in svg
    assert "40,000 prompt" not in svg
    assert f'<option value="{batch.pk}" selected>API key batch</option>' in content
    keys = re.search(r'<table id="usage-keys">.*?</table>', content, re.S).group(0)
    assert "batch" in keys
    assert "default" not in keys
    quotas = re.search(r'<table id="usage-quotas">.*?</table>', content, re.S).group(0)
    assert "<td>key batch</td>" in quotas
    assert "<td>tenant</td>" in quotas
    assert "key default" not in quotas


def test_it_links_each_key_to_its_usage(admin_client: Client, busy: TenantKey) -> None:
    content = admin_client.get(usage_page(busy.tenant.pk)).content.decode()

    assert f'<a href="?key={busy.api_key.pk}">default</a>' in content
    assert f'<option value="{busy.api_key.pk}">API key default</option>' in content


@pytest.mark.parametrize("value", ["other-tenant", "not-a-number", "987654"])
def test_it_answers_404_for_a_key_that_is_not_the_tenants(
    admin_client: Client, alice: TenantKey, bob: TenantKey, value: str
) -> None:
    key = {"other-tenant": str(bob.api_key.pk)}.get(value, value)

    assert admin_client.get(usage_page(alice.tenant.pk), {"key": key}).status_code == 404


def test_it_renders_an_empty_usage_page(admin_client: Client, alice: TenantKey) -> None:
    content = admin_client.get(usage_page(alice.tenant.pk)).content.decode()

    assert "no requests in this period" in content
    assert "No token quota" in content


def test_it_keeps_the_usage_page_queries_constant(admin_client: Client, alice: TenantKey) -> None:
    log(alice, 1, 1)
    quota_set(tenant=alice.tenant, tokens=10, period="day")
    one = queries(admin_client, usage_page(alice.tenant.pk))
    for i in range(5):
        key = api_key_create(tenant=alice.tenant, name=f"k{i}").api_key
        quota_set(tenant=alice.tenant, tokens=10, period="hour", api_key=key)
        for days_ago in range(0, 30, 3):
            log(alice, 100, 10, days_ago=days_ago, key=key)

    assert queries(admin_client, usage_page(alice.tenant.pk)) <= one


def test_it_answers_404_for_an_unknown_tenant(admin_client: Client) -> None:
    assert admin_client.get(usage_page(987654)).status_code == 404


def test_it_sends_anonymous_visitors_to_the_login_page(client: Client, alice: TenantKey) -> None:
    response = client.get(usage_page(alice.tenant.pk))

    assert response.status_code == 302
    assert "/login/" in response["Location"]


def test_it_shows_usage_only_to_staff_allowed_to_see_quotas(
    client: Client, alice: TenantKey
) -> None:
    user = User.objects.create_user("ops", password="pw-12345678", is_staff=True)
    client.force_login(user)
    assert client.get(usage_page(alice.tenant.pk)).status_code == 403

    user.user_permissions.add(Permission.objects.get(codename="view_quota"))

    assert client.get(usage_page(alice.tenant.pk)).status_code == 200
