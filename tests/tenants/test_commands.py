from __future__ import annotations

from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, ManagementUtility, call_command
from django.utils import timezone

from apps.tenants.models import ApiKey, Tenant
from apps.tenants.services import api_key_create, hash_key, tenant_create

pytestmark = pytest.mark.django_db


def run(*args: str) -> list[str]:
    out = StringIO()
    call_command(*args, stdout=out, stderr=StringIO())
    return out.getvalue().splitlines()


# --- create_tenant -----------------------------------------------------------------


def test_it_creates_a_tenant() -> None:
    lines = run("create_tenant", "acme", "--name", "Acme Inc")

    assert lines == ["Created tenant acme"]
    tenant = Tenant.objects.get()
    assert (tenant.slug, tenant.name, tenant.active) == ("acme", "Acme Inc", True)


def test_it_names_the_tenant_after_its_slug_by_default() -> None:
    run("create_tenant", "acme")

    assert Tenant.objects.get().name == "acme"


def test_it_refuses_an_existing_slug() -> None:
    tenant_create(slug="acme", name="First")

    with pytest.raises(CommandError, match="already exists"):
        run("create_tenant", "acme", "--name", "Second")

    assert list(Tenant.objects.values_list("name", flat=True)) == ["First"]


@pytest.mark.parametrize("slug", ["not a slug", "acme!", ""])
def test_it_refuses_an_invalid_slug(slug: str) -> None:
    with pytest.raises(CommandError, match="slug"):
        run("create_tenant", slug)

    assert not Tenant.objects.exists()


def test_it_exits_with_status_1_on_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        ManagementUtility(["manage.py", "create_tenant", "bad slug"]).execute()

    assert exc.value.code == 1
    assert "Cannot create tenant 'bad slug'" in capsys.readouterr().err


# --- create_api_key ----------------------------------------------------------------


@pytest.fixture
def tenant() -> Tenant:
    return tenant_create(slug="acme")


def test_it_prints_the_new_key_alone_on_the_last_line(tenant: Tenant) -> None:
    lines = run("create_api_key", "acme")

    api_key = ApiKey.objects.get()
    raw_key = lines[-1]
    assert raw_key.startswith(f"sk-{api_key.prefix}_")
    assert hash_key(raw_key) == api_key.key_hash
    assert len(lines) > 1
    assert all(raw_key not in line for line in lines[:-1])
    assert (api_key.tenant, api_key.name, api_key.expires_at) == (tenant, "key-1", None)


def test_it_numbers_default_names_after_the_keys_count(tenant: Tenant) -> None:
    run("create_api_key", "acme")
    run("create_api_key", "acme")

    names = set(tenant.api_keys.values_list("name", flat=True))
    assert names == {"key-1", "key-2"}


def test_it_skips_default_names_already_taken(tenant: Tenant) -> None:
    api_key_create(tenant=tenant, name="key-2")
    run("create_api_key", "acme")

    names = set(tenant.api_keys.values_list("name", flat=True))
    assert names == {"key-2", "key-3"}


def test_it_uses_the_given_name_and_expiry(tenant: Tenant) -> None:
    before = timezone.now()
    run("create_api_key", "acme", "--name", "ci", "--expires-in-days", "30")

    api_key = ApiKey.objects.get()
    assert api_key.name == "ci"
    assert before + timedelta(days=30) <= api_key.expires_at
    assert api_key.expires_at <= timezone.now() + timedelta(days=30)


def test_it_refuses_an_unknown_tenant(tenant: Tenant) -> None:
    with pytest.raises(CommandError, match="No tenant with slug 'nope'"):
        run("create_api_key", "nope")

    assert not ApiKey.objects.exists()


def test_it_refuses_a_duplicate_name(tenant: Tenant) -> None:
    existing = api_key_create(tenant=tenant, name="ci").api_key

    with pytest.raises(CommandError, match="already has a key named 'ci'"):
        run("create_api_key", "acme", "--name", "ci")

    assert list(ApiKey.objects.all()) == [existing]


def test_it_allows_the_same_name_for_another_tenant(tenant: Tenant) -> None:
    api_key_create(tenant=tenant_create(slug="other"), name="ci")

    run("create_api_key", "acme", "--name", "ci")

    assert tenant.api_keys.get().name == "ci"


@pytest.mark.parametrize("days", ["0", "-3"])
def test_it_refuses_a_non_positive_expiry(tenant: Tenant, days: str) -> None:
    with pytest.raises(CommandError, match="positive"):
        run("create_api_key", "acme", "--expires-in-days", days)

    assert not ApiKey.objects.exists()


def test_it_refuses_a_too_long_name(tenant: Tenant) -> None:
    with pytest.raises(CommandError, match="name"):
        run("create_api_key", "acme", "--name", "x" * 101)

    assert not ApiKey.objects.exists()
