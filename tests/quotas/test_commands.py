"""set_quota, set_rate_limit and release_stale_reservations."""

from __future__ import annotations

from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, ManagementUtility, call_command
from django.utils import timezone

from apps.quotas.models import Quota, QuotaWindow, Reservation
from apps.quotas.services import quota_reserve, quota_set
from apps.tenants.models import ApiKey, Tenant
from tests.conftest import TenantKey

pytestmark = pytest.mark.django_db


def run(*args: str) -> list[str]:
    out = StringIO()
    call_command(*args, stdout=out, stderr=StringIO())
    return out.getvalue().splitlines()


def quotas() -> set[tuple[str, str | None, str, int]]:
    return set(Quota.objects.values_list("tenant__slug", "api_key__name", "period", "limit_tokens"))


# --- set_quota ---------------------------------------------------------------------------


def test_it_sets_a_tenant_quota_and_prints_what_is_in_force(alice: TenantKey) -> None:
    lines = run("set_quota", "alice", "--tokens", "100000", "--period", "day")

    assert lines[0] == "Set the day token quota of tenant alice to 100,000 tokens."
    assert lines[1] == "In force for tenant alice:"
    assert lines[2].startswith(
        "  tenant (day): 100,000 tokens per day, 0 used, 0 reserved, 100,000 left; resets at "
    )
    assert quotas() == {("alice", None, "day", 100_000)}


def test_it_sets_a_key_quota(alice: TenantKey) -> None:
    run("set_quota", "alice", "--tokens", "5000", "--period", "month")

    lines = run(
        "set_quota", "alice", "--tokens", "50", "--period", "total", "--api-key-name", "default"
    )

    assert lines[0] == "Set the total token quota of key default of tenant alice to 50 tokens."
    assert lines[1:] == [
        "In force for tenant alice:",
        lines[2],
        "  key default (total): 50 tokens in total, 0 used, 0 reserved, 50 left; it never resets",
    ]
    assert lines[2].startswith("  tenant (month): 5,000 tokens per month")
    assert quotas() == {("alice", None, "month", 5000), ("alice", "default", "total", 50)}


def test_it_replaces_a_quota_keeping_its_usage(alice: TenantKey) -> None:
    run("set_quota", "alice", "--tokens", "1000", "--period", "hour")
    quota_reserve(tenant_id=alice.tenant.pk, api_key_id=alice.api_key.pk, tokens=300)

    lines = run("set_quota", "alice", "--tokens", "2000", "--period", "hour")

    assert "2,000 tokens per hour, 0 used, 300 reserved, 1,700 left" in lines[2]
    assert quotas() == {("alice", None, "hour", 2000)}


def test_it_removes_a_quota_with_zero_tokens(alice: TenantKey) -> None:
    run("set_quota", "alice", "--tokens", "1000", "--period", "hour")

    lines = run("set_quota", "alice", "--tokens", "0", "--period", "hour")

    assert lines == [
        "Removed the hour token quota of tenant alice (if any).",
        "No token quota in force for tenant alice.",
    ]
    assert not Quota.objects.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nobody", "--tokens", "10", "--period", "day"], "No tenant with slug 'nobody'"),
        (["alice", "--tokens", "-1", "--period", "day"], "--tokens must be 0 .* got -1"),
        (["alice", "--tokens", "10", "--period", "week"], "invalid choice: 'week'"),
        (["alice", "--tokens", "ten", "--period", "day"], "invalid int value"),
        (["alice", "--period", "day"], "--tokens"),
        (
            ["alice", "--tokens", "10", "--period", "day", "--api-key-name", "nope"],
            "Tenant alice has no API key named 'nope'",
        ),
    ],
)
def test_it_refuses_bad_arguments_and_writes_nothing(
    alice: TenantKey, args: list[str], message: str
) -> None:
    quota_set(tenant=alice.tenant, tokens=777, period="day")

    with pytest.raises(CommandError, match=message):
        run("set_quota", *args)

    assert quotas() == {("alice", None, "day", 777)}


def test_it_does_not_find_another_tenants_key(alice: TenantKey, bob: TenantKey) -> None:
    ApiKey.objects.filter(pk=alice.api_key.pk).update(name="other")

    with pytest.raises(CommandError, match="Tenant bob has no API key named 'other'"):
        run("set_quota", "bob", "--tokens", "1", "--period", "day", "--api-key-name", "other")

    assert not Quota.objects.exists()


def test_it_exits_with_status_1_on_error(alice: TenantKey) -> None:
    with pytest.raises(SystemExit) as exc:
        ManagementUtility(
            ["manage.py", "set_quota", "alice", "--tokens", "-5", "--period", "day"]
        ).execute()

    assert exc.value.code == 1


# --- set_rate_limit ----------------------------------------------------------------------


def test_it_sets_a_tenant_rate_limit(alice: TenantKey) -> None:
    lines = run("set_rate_limit", "alice", "--rpm", "600")

    assert lines == [
        "Rate limit of tenant alice: 600 requests per minute.",
        "In force for tenant alice:",
        "  tenant: 600 requests per minute",
        "  key default: no limit",
    ]
    assert Tenant.objects.get(slug="alice").requests_per_minute == 600


def test_it_sets_and_removes_a_key_rate_limit(alice: TenantKey) -> None:
    lines = run("set_rate_limit", "alice", "--rpm", "30", "--api-key-name", "default")

    assert lines[0] == "Rate limit of key default of tenant alice: 30 requests per minute."
    assert lines[-1] == "  key default: 30 requests per minute"
    assert ApiKey.objects.get(pk=alice.api_key.pk).requests_per_minute == 30

    lines = run("set_rate_limit", "alice", "--rpm", "0", "--api-key-name", "default")

    assert lines[0] == "Rate limit of key default of tenant alice: no limit."
    assert ApiKey.objects.get(pk=alice.api_key.pk).requests_per_minute is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nobody", "--rpm", "10"], "No tenant with slug 'nobody'"),
        (["alice", "--rpm", "-1"], "--rpm must be 0 .* got -1"),
        (["alice", "--rpm", "10", "--api-key-name", "nope"], "no API key named 'nope'"),
        (["alice"], "--rpm"),
    ],
)
def test_it_refuses_bad_rate_limits_and_writes_nothing(
    alice: TenantKey, args: list[str], message: str
) -> None:
    Tenant.objects.filter(pk=alice.tenant.pk).update(requests_per_minute=99)

    with pytest.raises(CommandError, match=message):
        run("set_rate_limit", *args)

    assert Tenant.objects.get(pk=alice.tenant.pk).requests_per_minute == 99
    assert ApiKey.objects.get(pk=alice.api_key.pk).requests_per_minute is None


# --- release_stale_reservations ----------------------------------------------------------


def test_it_releases_stale_reservations(alice: TenantKey) -> None:
    quota_set(tenant=alice.tenant, tokens=1000, period="day")
    quota_reserve(tenant_id=alice.tenant.pk, api_key_id=alice.api_key.pk, tokens=100)
    quota_reserve(tenant_id=alice.tenant.pk, api_key_id=alice.api_key.pk, tokens=200)
    Reservation.objects.filter(tokens=100).update(
        created_at=timezone.now() - timedelta(seconds=1000)
    )

    assert run("release_stale_reservations") == ["Released 1 reservation(s) older than 900 s."]
    assert QuotaWindow.objects.get().reserved_tokens == 200
    assert run("release_stale_reservations", "--older-than", "0") == [
        "Released 1 reservation(s) older than 0 s."
    ]
    assert QuotaWindow.objects.get().reserved_tokens == 0


def test_it_refuses_a_negative_age() -> None:
    with pytest.raises(CommandError, match="--older-than"):
        run("release_stale_reservations", "--older-than", "-1")
