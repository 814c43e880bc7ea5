from __future__ import annotations

from argparse import ArgumentParser
from datetime import datetime, timedelta
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import CommandError
from django.utils import timezone

from apps.core.commands import SetupCommand, error_text
from apps.tenants.models import Tenant
from apps.tenants.services import api_key_create


def default_name(tenant: Tenant) -> str:
    """`key-<n>`, the first n not yet used by this tenant."""
    taken = set(tenant.api_keys.values_list("name", flat=True))
    n = len(taken) + 1
    while f"key-{n}" in taken:
        n += 1
    return f"key-{n}"


def expiry(days: int | None) -> datetime | None:
    if days is None:
        return None
    if days <= 0:
        raise CommandError("--expires-in-days must be a positive number of days.")
    return timezone.now() + timedelta(days=days)


class Command(SetupCommand):
    help = "Create an API key for a tenant; the key is printed alone on the last line."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("tenant", help="The tenant's slug.")
        parser.add_argument("--name", help="Key name, unique per tenant (default: key-<n>).")
        parser.add_argument(
            "--expires-in-days", type=int, help="Expire the key after N days (default: never)."
        )

    def handle(self, *args: Any, tenant: str, **options: Any) -> None:
        expires_at = expiry(options["expires_in_days"])
        owner = Tenant.objects.filter(slug=tenant).first()
        if owner is None:
            raise CommandError(f"No tenant with slug {tenant!r}.")
        name = options["name"] or default_name(owner)
        if owner.api_keys.filter(name=name).exists():
            raise CommandError(f"Tenant {owner.slug} already has a key named {name!r}.")
        try:
            created = api_key_create(tenant=owner, name=name, expires_at=expires_at)
        except ValidationError as e:
            raise CommandError(f"Cannot create key {name!r}: {error_text(e)}") from e

        if not owner.active:
            self.stderr.write(f"Warning: tenant {owner.slug} is inactive; the key gets 403.")
        self.stdout.write(f"Created API key {name!r} for tenant {owner.slug}.")
        self.stdout.write(f"Expires: {expires_at.isoformat() if expires_at else 'never'}")
        self.stdout.write("Copy the key now, it will not be shown again:")
        self.stdout.write(created.raw_key)
