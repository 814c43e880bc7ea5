from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth.models import Permission, User
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from apps.request_logs.models import RequestLog
from apps.tenants.models import Tenant
from apps.tenants.services import api_key_create, tenant_create

pytestmark = pytest.mark.django_db

CHANGELIST = reverse("admin:request_logs_requestlog_changelist")
ADD = reverse("admin:request_logs_requestlog_add")


def change_url(log: RequestLog) -> str:
    return reverse("admin:request_logs_requestlog_change", args=[log.pk])


def delete_url(log: RequestLog) -> str:
    return reverse("admin:request_logs_requestlog_delete", args=[log.pk])


def make_log(tenant: Tenant, n: int = 0, **fields: Any) -> RequestLog:
    api_key = api_key_create(tenant=tenant, name=f"key-{n}").api_key
    defaults = {
        "endpoint": "chat.completions",
        "model": "qwen3-8b",
        "engine": "local",
        "status_code": 200,
        "prompt_tokens": 12,
        "completion_tokens": 34,
        "ttft_ms": 80.5,
        "latency_ms": 900.0,
    }
    return RequestLog.objects.create(tenant=tenant, api_key=api_key, **{**defaults, **fields})


@pytest.fixture
def log() -> RequestLog:
    return make_log(tenant_create(slug="acme"), stream=True)


@pytest.fixture
def viewer(client: Client) -> Client:
    """A staff user who may only view request logs."""
    user = User.objects.create_user("viewer", password="x", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_requestlog"))
    client.force_login(user)
    return client


def test_it_lists_request_logs(admin_client: Client, log: RequestLog) -> None:
    response = admin_client.get(CHANGELIST)

    assert response.status_code == 200
    content = response.content.decode()
    assert "acme" in content
    assert "key-0" in content
    assert "qwen3-8b" in content
    assert ADD not in content  # no "Add" button


def test_it_shows_times_in_rounded_milliseconds(admin_client: Client) -> None:
    log = make_log(tenant_create(slug="acme"), ttft_ms=6.288019998464733, latency_ms=912.5001)

    listed = admin_client.get(CHANGELIST).content.decode()
    page = admin_client.get(change_url(log)).content.decode()

    for content in (listed, page):
        assert "6 ms" in content
        assert "913 ms" in content
        assert "6.288" not in content
        assert "912.5" not in content


def test_it_links_view_site_to_a_real_page(admin_client: Client) -> None:
    index = admin_client.get(reverse("admin:index"))

    assert index.context["site_url"] == "/health"
    assert 'href="/health">View site' in index.content.decode()


def test_it_shows_a_log_read_only(admin_client: Client, log: RequestLog) -> None:
    response = admin_client.get(change_url(log))

    assert response.status_code == 200
    assert not response.context["adminform"].form.fields
    assert 'name="_save"' not in response.content.decode()


def test_it_refuses_to_add_logs(admin_client: Client) -> None:
    assert admin_client.get(ADD).status_code == 403


def test_it_refuses_to_change_logs(admin_client: Client, log: RequestLog) -> None:
    response = admin_client.post(change_url(log), {"status_code": 500, "latency_ms": 1})

    assert response.status_code == 403
    log.refresh_from_db()
    assert log.status_code == 200


def test_it_lets_superusers_delete_logs(admin_client: Client, log: RequestLog) -> None:
    response = admin_client.post(delete_url(log), {"post": "yes"})

    assert response.status_code == 302
    assert not RequestLog.objects.exists()


def test_it_lets_viewers_only_view(viewer: Client, log: RequestLog) -> None:
    assert viewer.get(CHANGELIST).status_code == 200
    assert viewer.get(change_url(log)).status_code == 200
    assert viewer.get(ADD).status_code == 403
    assert viewer.post(delete_url(log), {"post": "yes"}).status_code == 403
    assert RequestLog.objects.filter(pk=log.pk).exists()


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"status_code": "500"}, ["boom"]),
        ({"stream__exact": "1"}, ["streamed"]),
        ({"client_disconnected__exact": "1"}, ["boom"]),
        ({"endpoint": "embeddings"}, ["embedded"]),
        ({"q": "other"}, ["embedded"]),  # tenant slug
        ({"q": "llama-big"}, ["boom"]),  # model
        ({"q": "gpu"}, ["streamed"]),  # engine
    ],
)
def test_it_filters_and_searches(
    admin_client: Client, params: dict[str, str], expected: list[str]
) -> None:
    acme, other = tenant_create(slug="acme"), tenant_create(slug="other")
    make_log(acme, 1, error_code="boom", status_code=500, model="llama-big")
    make_log(acme, 2, error_code="streamed", stream=True, engine="gpu")
    make_log(other, 3, error_code="embedded", endpoint="embeddings")
    RequestLog.objects.filter(error_code="boom").update(client_disconnected=True)

    response = admin_client.get(CHANGELIST, params)

    assert response.status_code == 200
    assert [log.error_code for log in response.context["cl"].result_list] == expected


def test_it_filters_by_tenant(admin_client: Client) -> None:
    acme, other = tenant_create(slug="acme"), tenant_create(slug="other")
    make_log(acme, 1)
    make_log(other, 2)

    response = admin_client.get(CHANGELIST, {"tenant__id__exact": other.pk})

    assert [log.tenant for log in response.context["cl"].result_list] == [other]


def test_it_shows_logs_of_deleted_keys(admin_client: Client, log: RequestLog) -> None:
    log.api_key.delete()

    assert admin_client.get(CHANGELIST).status_code == 200


def test_it_keeps_changelist_queries_constant(
    admin_client: Client, django_assert_max_num_queries: Any
) -> None:
    make_log(tenant_create(slug="t0"))
    with CaptureQueriesContext(connection) as one_row:
        admin_client.get(CHANGELIST)
    for i in range(1, 8):
        make_log(tenant_create(slug=f"t{i}"), i)

    with django_assert_max_num_queries(len(one_row.captured_queries)):
        response = admin_client.get(CHANGELIST)

    assert response.status_code == 200
    assert len(response.context["cl"].result_list) == 8


def test_it_lists_the_cached_prompt_tokens(admin_client: Client) -> None:
    make_log(tenant_create(slug="acme"), prompt_tokens=1200, cached_tokens=987)

    content = admin_client.get(CHANGELIST).content.decode()

    assert '<td class="field-cached_tokens">987</td>' in content
    assert "Cached tokens" in content  # the column heading
