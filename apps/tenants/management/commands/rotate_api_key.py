from __future__ import annotations

from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from apps.tenants.durations import parse_grace
from apps.tenants.models import Tenant
from apps.tenants.services import RotationError, api_key_rotate


class Command(BaseCommand):
    help = (
        "Issue a new secret for an API key; the old one keeps working for the grace period. "
        "The new key is printed alone on the last line."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("tenant", help="The tenant's slug.")
        parser.add_argument("--name", required=True, help="The key's name.")
        parser.add_argument(
            "--grace", default="24h", help="How long the old key keeps working (default 24h)."
        )

    def handle(self, *args: Any, tenant: str, name: str, grace: str, **options: Any) -> None:
        try:
            period = parse_grace(grace)
        except ValueError as e:
            raise CommandError(str(e)) from e
        owner = Tenant.objects.filter(slug=tenant).first()
        if owner is None:
            raise CommandError(f"No tenant with slug {tenant!r}.")
        api_key = owner.api_keys.filter(name=name).first()
        if api_key is None:
            raise CommandError(f"Tenant {tenant} has no key named {name!r}.")
        try:
            rotated = api_key_rotate(api_key=api_key, grace=period)
        except RotationError as e:
            raise CommandError(str(e)) from e
        old = rotated.api_key.rotated_keys.first()
        self.stdout.write(f"Rotated API key {name!r} of tenant {tenant}.")
        self.stdout.write(f"The old key works until {old.grace_ends_at.isoformat()}.")
        self.stdout.write("Copy the new key now, it will not be shown again:")
        self.stdout.write(rotated.raw_key)
