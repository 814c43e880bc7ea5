from __future__ import annotations

from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from apps.quotas.costs import money
from apps.quotas.management.commands._scope import decimal_option, tenant_and_key
from apps.quotas.models import Unit
from apps.quotas.selectors import quota_states
from apps.quotas.services import budget_set
from apps.quotas.state import describe_reset


class Command(BaseCommand):
    help = (
        "Set a cost budget (currency units per day, month or in total, at the models' "
        "prices) for a tenant or one of its API keys; --amount 0 removes it."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("tenant", help="The tenant's slug.")
        parser.add_argument("--amount", required=True, help="e.g. 2.50; 0 removes the budget.")
        parser.add_argument("--period", required=True, choices=["day", "month", "total"])
        parser.add_argument("--api-key-name", help="Limit this key only (default: the tenant).")

    def handle(self, *args: Any, tenant: str, **options: Any) -> None:
        amount = decimal_option(options["amount"], "--amount")
        owner, api_key = tenant_and_key(tenant, options["api_key_name"])
        period = options["period"]
        try:
            budget = budget_set(tenant=owner, amount=amount, period=period, api_key=api_key)
        except ValueError as e:
            raise CommandError(str(e)) from e
        scope = f"key {api_key.name} of tenant {owner.slug}" if api_key else f"tenant {owner.slug}"
        if budget is None:
            self.stdout.write(f"Removed the {period} budget of {scope} (if any).")
        else:
            self.stdout.write(f"Set the {period} budget of {scope} to {amount}.")
        for state in quota_states(tenant_id=owner.pk, unit=Unit.COST):
            self.stdout.write(
                f"  {state.scope} ({state.period}): {money(state.limit)}, "
                f"{money(state.used)} spent, {money(state.reserved)} reserved, "
                f"{money(state.remaining)} left; {describe_reset(state)}"
            )
