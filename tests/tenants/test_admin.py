"""Admin pages for tenants, API keys, engines and served models."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from apps.engines.models import Engine, ServedModel
from apps.engines.services import engine_register_external
from apps.tenants.models import ApiKey, Tenant
from apps.tenants.services import api_key_create, api_key_revoke, hash_key, tenant_create

pytestmark = pytest.mark.django_db

RAW_KEY = re.compile(r"sk-[a-z0-9]{12}_[A-Za-z0-9_-]+")


def url(model: type, view: str, *args: Any) -> str:
    return reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_{view}", args=args)


@pytest.fixture
def tenant() -> Tenant:
    return tenant_create(slug="acme", name="Acme")


@pytest.fixture
def api_key(tenant: Tenant) -> ApiKey:
    return api_key_create(tenant=tenant, name="ci").api_key


@pytest.fixture
def engine() -> Engine:
    return engine_register_external(
        name="local", base_url="http://127.0.0.1:8080", models=["qwen3-8b"], ctx_size=8192
    )


def changelist_queries(client: Client, model: type) -> int:
    with CaptureQueriesContext(connection) as ctx:
        assert client.get(url(model, "changelist")).status_code == 200
    return len(ctx.captured_queries)


def assert_at_most(client: Client, model: type, queries: int, assert_max: Any) -> None:
    with assert_max(queries):
        response = client.get(url(model, "changelist"))
    assert response.status_code == 200
    assert len(response.context["cl"].result_list) > 1


# --- every page renders ------------------------------------------------------------


@pytest.mark.parametrize("model", [Tenant, ApiKey, Engine, ServedModel])
def test_it_renders_changelist_add_and_change_pages(
    admin_client: Client, api_key: ApiKey, engine: Engine, model: type
) -> None:
    obj = model.objects.first()
    assert admin_client.get(url(model, "changelist")).status_code == 200
    assert admin_client.get(url(model, "add")).status_code == 200
    assert admin_client.get(url(model, "change", obj.pk)).status_code == 200


@pytest.mark.parametrize("model", [Tenant, ApiKey, Engine, ServedModel])
def test_it_renders_search_results(admin_client: Client, api_key: ApiKey, model: type) -> None:
    response = admin_client.get(url(model, "changelist"), {"q": "acme"})

    assert response.status_code == 200


# --- tenants -----------------------------------------------------------------------


def test_it_lists_tenants_with_their_key_count(admin_client: Client, api_key: ApiKey) -> None:
    api_key_create(tenant=api_key.tenant, name="other")
    tenant_create(slug="empty")

    content = admin_client.get(url(Tenant, "changelist")).content.decode()

    assert '<td class="field-key_count">2</td>' in content
    assert '<td class="field-key_count">0</td>' in content


def test_it_shows_the_tenants_keys_read_only_with_links(
    admin_client: Client, api_key: ApiKey
) -> None:
    response = admin_client.get(url(Tenant, "change", api_key.tenant.pk))

    content = response.content.decode()
    assert api_key.prefix in content
    assert url(ApiKey, "change", api_key.pk) in content
    assert 'name="api_keys-0-name"' not in content  # not an editable field
    assert api_key.key_hash not in content


@pytest.mark.parametrize("model", [Tenant, ServedModel])
def test_it_keeps_change_page_queries_constant(
    admin_client: Client, model: type, django_assert_max_num_queries: Any
) -> None:
    tenant = tenant_create(slug="acme")
    engine_register_external(name="e0", base_url="http://10.0.0.100:80", models=["m"])
    api_key_create(tenant=tenant, name="k0")
    page = url(model, "change", model.objects.get().pk)
    with CaptureQueriesContext(connection) as one_row:
        admin_client.get(page)
    for i in range(1, 6):
        api_key_create(tenant=tenant, name=f"k{i}")
        engine_register_external(name=f"e{i}", base_url=f"http://10.0.0.{i}:80", models=["m"])

    with django_assert_max_num_queries(len(one_row.captured_queries)):
        assert admin_client.get(page).status_code == 200


def tenant_form(**fields: Any) -> dict[str, Any]:
    """The tenant change form as the admin posts it (unchecked boxes are left out)."""
    return {
        "slug": "acme",
        "name": "Acme",
        "active": "on",
        "scheduling_weight": "1",
        "system_prompt": "",
        "requests_per_minute": "",
        "api_keys-TOTAL_FORMS": "0",
        "api_keys-INITIAL_FORMS": "0",
        "memberships-TOTAL_FORMS": "0",
        "memberships-INITIAL_FORMS": "0",
        **fields,
    }


def test_it_edits_a_tenants_allowed_models(
    admin_client: Client, tenant: Tenant, engine: Engine
) -> None:
    model = ServedModel.objects.get()
    response = admin_client.post(
        url(Tenant, "change", tenant.pk), tenant_form(allowed_models=[model.pk])
    )

    assert response.status_code == 302
    tenant.refresh_from_db()
    assert list(tenant.allowed_models.all()) == [model]
    assert tenant.restrict_models  # picking models restricts the tenant to them


def test_it_lifts_a_restriction_but_keeps_the_list(
    admin_client: Client, tenant: Tenant, engine: Engine
) -> None:
    model = ServedModel.objects.get()
    tenant.allowed_models.set([model])

    response = admin_client.post(
        url(Tenant, "change", tenant.pk), tenant_form(allowed_models=[model.pk])
    )

    assert response.status_code == 302
    tenant.refresh_from_db()
    assert not tenant.restrict_models  # the box was unticked: every model again
    assert list(tenant.allowed_models.all()) == [model]


def test_it_restricts_a_tenant_to_no_model(admin_client: Client, tenant: Tenant) -> None:
    response = admin_client.post(
        url(Tenant, "change", tenant.pk), tenant_form(restrict_models="on")
    )

    assert response.status_code == 302
    tenant.refresh_from_db()
    assert tenant.restrict_models
    assert not tenant.allowed_models.exists()


def test_it_sets_a_tenants_rate_limit_and_default_system_prompt(
    admin_client: Client, tenant: Tenant
) -> None:
    response = admin_client.post(
        url(Tenant, "change", tenant.pk),
        tenant_form(requests_per_minute="120", system_prompt="Answer in French."),
    )

    assert response.status_code == 302
    tenant.refresh_from_db()
    assert (tenant.requests_per_minute, tenant.system_prompt) == (120, "Answer in French.")


def test_it_keeps_tenant_changelist_queries_constant(
    admin_client: Client, django_assert_max_num_queries: Any
) -> None:
    api_key_create(tenant=tenant_create(slug="t0"), name="k")
    baseline = changelist_queries(admin_client, Tenant)
    for i in range(1, 6):
        api_key_create(tenant=tenant_create(slug=f"t{i}"), name="k")

    assert_at_most(admin_client, Tenant, baseline, django_assert_max_num_queries)


# --- API keys: one-time display ----------------------------------------------------


def add_key(client: Client, tenant: Tenant, name: str = "laptop", rpm: str = "") -> Any:
    return client.post(
        url(ApiKey, "add"),
        {
            "tenant": tenant.pk,
            "name": name,
            "expires_at_0": "",
            "expires_at_1": "",
            "requests_per_minute": rpm,
        },
        follow=True,
    )


def test_it_shows_a_new_key_once(admin_client: Client, tenant: Tenant) -> None:
    response = add_key(admin_client, tenant)

    assert response.status_code == 200
    texts = [str(m) for m in response.context["messages"]]
    shown = [t for t in texts if "it will not be shown again" in t]
    assert len(shown) == 1
    assert "Copy this key now" in shown[0]
    raw_key = RAW_KEY.search(shown[0]).group()
    api_key = ApiKey.objects.get()
    assert (api_key.tenant, api_key.name) == (tenant, "laptop")
    assert hash_key(raw_key) == api_key.key_hash
    assert raw_key.startswith(f"sk-{api_key.prefix}_")
    assert raw_key in response.content.decode()

    # Never again: not on the change page, nor the changelist.
    for page in [url(ApiKey, "change", api_key.pk), url(ApiKey, "changelist")]:
        content = admin_client.get(page).content.decode()
        assert raw_key not in content
        assert api_key.key_hash not in content
        assert f"sk-{api_key.prefix}_…" in content


def test_it_asks_only_tenant_name_expiry_and_rate_limit_on_add(admin_client: Client) -> None:
    form = admin_client.get(url(ApiKey, "add")).context["adminform"].form

    assert list(form.fields) == ["tenant", "name", "expires_at", "requests_per_minute"]


def test_it_sets_a_keys_rate_limit_on_add(admin_client: Client, tenant: Tenant) -> None:
    add_key(admin_client, tenant, rpm="30")

    assert ApiKey.objects.get().requests_per_minute == 30


def test_it_changes_and_removes_a_keys_rate_limit(admin_client: Client, api_key: ApiKey) -> None:
    page = url(ApiKey, "change", api_key.pk)
    form = {"name": "ci", "expires_at_0": "", "expires_at_1": ""}

    assert admin_client.post(page, {**form, "requests_per_minute": "600"}).status_code == 302
    api_key.refresh_from_db()
    assert api_key.requests_per_minute == 600
    assert admin_client.post(page, {**form, "requests_per_minute": ""}).status_code == 302
    api_key.refresh_from_db()
    assert api_key.requests_per_minute is None  # empty: no limit


def test_it_refuses_a_duplicate_key_name_on_add(admin_client: Client, api_key: ApiKey) -> None:
    response = add_key(admin_client, api_key.tenant, name="ci")

    assert response.status_code == 200
    assert response.context["adminform"].form.errors
    assert ApiKey.objects.count() == 1


def test_it_keeps_secrets_read_only_on_change(admin_client: Client, api_key: ApiKey) -> None:
    response = admin_client.get(url(ApiKey, "change", api_key.pk))

    form = response.context["adminform"].form
    assert set(form.fields) == {"name", "expires_at", "requests_per_minute"}
    assert api_key.key_hash not in response.content.decode()


def test_it_renames_a_key(admin_client: Client, api_key: ApiKey) -> None:
    response = admin_client.post(
        url(ApiKey, "change", api_key.pk),
        {"name": "renamed", "expires_at_0": "", "expires_at_1": ""},
    )

    assert response.status_code == 302
    api_key.refresh_from_db()
    assert api_key.name == "renamed"


def test_it_refuses_a_duplicate_name_on_change(admin_client: Client, api_key: ApiKey) -> None:
    other = api_key_create(tenant=api_key.tenant, name="other").api_key

    response = admin_client.post(
        url(ApiKey, "change", other.pk),
        {"name": "ci", "expires_at_0": "", "expires_at_1": ""},
    )

    assert response.status_code == 200
    assert "already has a key with this name" in response.content.decode()
    other.refresh_from_db()
    assert other.name == "other"


# --- API keys: status and revocation -----------------------------------------------


def test_it_filters_keys_by_status(admin_client: Client, tenant: Tenant) -> None:
    past = timezone.now() - timedelta(days=1)
    api_key_create(tenant=tenant, name="live")
    api_key_create(tenant=tenant, name="old", expires_at=past)
    api_key_revoke(api_key=api_key_create(tenant=tenant, name="gone").api_key)

    def names(status: str) -> list[str]:
        response = admin_client.get(url(ApiKey, "changelist"), {"status": status})
        return [k.name for k in response.context["cl"].result_list]

    assert names("active") == ["live"]
    assert names("expired") == ["old"]
    assert names("revoked") == ["gone"]


def test_it_revokes_selected_keys(admin_client: Client, tenant: Tenant) -> None:
    keys = [api_key_create(tenant=tenant, name=f"k{i}").api_key for i in range(3)]
    api_key_revoke(api_key=keys[0])
    keys[0].refresh_from_db()
    first_revoked_at = keys[0].revoked_at

    response = admin_client.post(
        url(ApiKey, "changelist"),
        {"action": "revoke", "_selected_action": [k.pk for k in keys[:2]]},
    )

    assert response.status_code == 302
    for key in keys:
        key.refresh_from_db()
    assert keys[0].revoked_at == first_revoked_at  # unchanged
    assert keys[1].revoked_at is not None
    assert keys[2].revoked_at is None


def test_it_revokes_a_key_from_its_page(admin_client: Client, api_key: ApiKey) -> None:
    page = url(ApiKey, "change", api_key.pk)
    assert 'name="_revoke"' in admin_client.get(page).content.decode()

    response = admin_client.post(
        page, {"name": "ci", "expires_at_0": "", "expires_at_1": "", "_revoke": "1"}
    )

    assert response.status_code == 302
    api_key.refresh_from_db()
    assert api_key.revoked_at is not None
    content = admin_client.get(page).content.decode()
    assert 'name="_revoke"' not in content
    assert "revoked" in content


def test_it_keeps_api_key_changelist_queries_constant(
    admin_client: Client, tenant: Tenant, django_assert_max_num_queries: Any
) -> None:
    api_key_create(tenant=tenant, name="k0")
    baseline = changelist_queries(admin_client, ApiKey)
    for i in range(1, 6):
        api_key_create(tenant=tenant_create(slug=f"t{i}"), name=f"k{i}")

    assert_at_most(admin_client, ApiKey, baseline, django_assert_max_num_queries)


# --- engines and served models -----------------------------------------------------


def test_it_hides_the_upstream_api_key(admin_client: Client, engine: Engine) -> None:
    engine.upstream_api_key = "upstream-secret"
    engine.save()

    response = admin_client.get(url(Engine, "change", engine.pk))

    field = response.context["adminform"].form["upstream_api_key"]
    assert 'type="password"' in str(field)
    changelist = admin_client.get(url(Engine, "changelist")).content.decode()
    assert "upstream-secret" not in changelist


def test_it_adds_an_engine_with_a_variant(admin_client: Client) -> None:
    model = ServedModel.objects.create(name="llama")

    response = admin_client.post(
        url(Engine, "add"),
        {
            "name": "gpu",
            "kind": "external",
            "flavor": "vllm",
            "base_url": "http://10.0.0.2:8000/",
            "upstream_api_key": "",
            "timeout_seconds": "600",
            "slots": "4",
            "replicas": "1",
            "startup_timeout_seconds": "120",
            "stop_grace_seconds": "10",
            "variants-TOTAL_FORMS": "1",
            "variants-INITIAL_FORMS": "0",
            "variants-0-model": model.pk,
            "variants-0-ctx_size": "4096",
        },
    )

    assert response.status_code == 302
    engine = Engine.objects.get()
    assert engine.base_url == "http://10.0.0.2:8000"
    assert list(engine.variants.values_list("model__name", "ctx_size")) == [("llama", 4096)]


def test_it_lists_engines_with_their_variant_count(admin_client: Client, engine: Engine) -> None:
    engine_register_external(name="local", base_url=engine.base_url, models=["other"])

    content = admin_client.get(url(Engine, "changelist")).content.decode()

    assert '<td class="field-variant_count">2</td>' in content


def test_it_shows_who_may_use_a_served_model(
    admin_client: Client, tenant: Tenant, engine: Engine
) -> None:
    model = ServedModel.objects.get()
    restricted = tenant_create(slug="restricted")
    restricted.allowed_models.add(model)
    Tenant.objects.create(slug="none-left", restrict_models=True)  # may use no model at all

    response = admin_client.get(url(ServedModel, "change", model.pk))

    content = response.content.decode()
    assert "restricted" in content
    assert "1 tenant(s) whose models are not restricted" in content
    assert "local" in content  # served by
    changelist = admin_client.get(url(ServedModel, "changelist")).content.decode()
    assert '<td class="field-variant_count">1</td>' in changelist
    assert '<td class="field-tenant_count">1</td>' in changelist


@pytest.mark.parametrize("model", [Engine, ServedModel])
def test_it_keeps_engine_changelist_queries_constant(
    admin_client: Client, model: type, django_assert_max_num_queries: Any
) -> None:
    engine_register_external(name="e0", base_url="http://10.0.0.100:80", models=["m0"])
    baseline = changelist_queries(admin_client, model)
    for i in range(1, 6):
        engine_register_external(name=f"e{i}", base_url=f"http://10.0.0.{i}:80", models=[f"m{i}"])

    assert_at_most(admin_client, model, baseline, django_assert_max_num_queries)
