"""Argument handling shared by set_quota and set_rate_limit."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

from django.core.management.base import CommandError

from apps.tenants.models import ApiKey, Tenant


def tenant_and_key(slug: str, key_name: str | None) -> tuple[Tenant, ApiKey | None]:
    tenant = Tenant.objects.filter(slug=slug).first()
    if tenant is None:
        raise CommandError(f"No tenant with slug {slug!r}.")
    if key_name is None:
        return tenant, None
    api_key = tenant.api_keys.filter(name=key_name).first()
    if api_key is None:
        raise CommandError(f"Tenant {tenant.slug} has no API key named {key_name!r}.")
    return tenant, api_key


def non_negative(value: int, option: str) -> int:
    if value < 0:
        raise CommandError(f"{option} must be 0 (remove) or more, got {value}.")
    return value


def decimal_option(value: str, option: str) -> Decimal:
    """A non-negative decimal amount of money (never a float)."""
    try:
        amount = Decimal(value.strip())
    except InvalidOperation:
        raise CommandError(f"{option} must be a decimal number, got {value!r}.") from None
    if not amount.is_finite() or amount < 0:
        raise CommandError(f"{option} must be 0 or more, got {value!r}.")
    return amount
