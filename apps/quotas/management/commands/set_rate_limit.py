from __future__ import annotations

from argparse import ArgumentParser
from typing import Any

from apps.core.commands import SetupCommand
from apps.quotas.management.commands._scope import non_negative, tenant_and_key
from apps.quotas.services import rate_limit_set
from apps.tenants.models import Tenant


def describe_rpm(rpm: int | None) -> str:
    return f"{rpm:,} requests per minute" if rpm else "no limit"


class Command(SetupCommand):
    help = "Set the requests-per-minute limit of a tenant or one of its API keys; 0 removes it."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("tenant", help="The tenant's slug.")
        parser.add_argument(
            "--rpm", type=int, required=True, help="Requests per minute; 0 removes."
        )
        parser.add_argument("--api-key-name", help="Limit this key only (default: the tenant).")

    def handle(self, *args: Any, tenant: str, **options: Any) -> None:
        rpm = non_negative(options["rpm"], "--rpm")
        owner, api_key = tenant_and_key(tenant, options["api_key_name"])
        rate_limit_set(tenant=owner, rpm=rpm, api_key=api_key)

        scope = f"key {api_key.name} of tenant {owner.slug}" if api_key else f"tenant {owner.slug}"
        self.stdout.write(f"Rate limit of {scope}: {describe_rpm(rpm or None)}.")
        self.write_in_force(owner)

    def write_in_force(self, tenant: Tenant) -> None:
        self.stdout.write(f"In force for tenant {tenant.slug}:")
        self.stdout.write(f"  tenant: {describe_rpm(tenant.requests_per_minute)}")
        for name, rpm in tenant.api_keys.order_by("name").values_list(
            "name", "requests_per_minute"
        ):
            self.stdout.write(f"  key {name}: {describe_rpm(rpm)}")
