from __future__ import annotations

from argparse import ArgumentParser
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import CommandError

from apps.core.commands import SetupCommand, error_text
from apps.tenants.services import tenant_create


class Command(SetupCommand):
    help = "Create a tenant."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("slug", help="Unique identifier: letters, digits, - and _.")
        parser.add_argument("--name", default="", help="Display name (default: the slug).")

    def handle(self, *args: Any, slug: str, name: str, **options: Any) -> None:
        try:
            tenant = tenant_create(slug=slug, name=name)
        except ValidationError as e:
            raise CommandError(f"Cannot create tenant {slug!r}: {error_text(e)}") from e
        self.stdout.write(f"Created tenant {tenant.slug}")
