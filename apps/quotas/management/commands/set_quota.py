from __future__ import annotations

from argparse import ArgumentParser
from typing import Any

from apps.core.commands import SetupCommand
from apps.quotas.management.commands._scope import non_negative, tenant_and_key
from apps.quotas.periods import Period
from apps.quotas.selectors import quota_states
from apps.quotas.services import quota_set
from apps.quotas.state import describe_limit, describe_reset


class Command(SetupCommand):
    help = (
        "Set a token quota (prompt + completion tokens per period) for a tenant or one of "
        "its API keys, replacing the one in force; --tokens 0 removes it."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("tenant", help="The tenant's slug.")
        parser.add_argument("--tokens", type=int, required=True, help="Limit; 0 removes it.")
        parser.add_argument("--period", required=True, choices=Period.values)
        parser.add_argument("--api-key-name", help="Limit this key only (default: the tenant).")

    def handle(self, *args: Any, tenant: str, **options: Any) -> None:
        tokens = non_negative(options["tokens"], "--tokens")
        owner, api_key = tenant_and_key(tenant, options["api_key_name"])
        period = options["period"]
        quota = quota_set(tenant=owner, tokens=tokens, period=period, api_key=api_key)

        scope = f"key {api_key.name} of tenant {owner.slug}" if api_key else f"tenant {owner.slug}"
        if quota is None:
            self.stdout.write(f"Removed the {period} token quota of {scope} (if any).")
        else:
            self.stdout.write(f"Set the {period} token quota of {scope} to {tokens:,} tokens.")
        self.write_in_force(owner.pk, owner.slug)

    def write_in_force(self, tenant_id: int, slug: str) -> None:
        states = quota_states(tenant_id=tenant_id)
        if not states:
            self.stdout.write(f"No token quota in force for tenant {slug}.")
            return
        self.stdout.write(f"In force for tenant {slug}:")
        for state in sorted(states, key=lambda s: (s.scope != "tenant", s.scope, s.quota_id)):
            self.stdout.write(
                f"  {state.scope} ({state.period}): {describe_limit(state)}, "
                f"{state.used:,} used, {state.reserved:,} reserved, {state.remaining:,} left; "
                f"{describe_reset(state)}"
            )
