from __future__ import annotations

from argparse import ArgumentParser
from typing import Any

from django.core.management.base import CommandError

from apps.core.commands import SetupCommand
from apps.tenants.models import Tenant
from apps.tools.models import BUILT_IN_TOOLS
from apps.tools.services import tools_allow


class Command(SetupCommand):
    help = (
        "Set the built-in tools a tenant may use (python, bash, web_search): "
        "`allow_tools acme python bash`, or `allow_tools acme --none`."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("tenant", help="The tenant's slug.")
        parser.add_argument("tools", nargs="*", help=f"Any of: {', '.join(BUILT_IN_TOOLS)}.")
        parser.add_argument("--none", action="store_true", help="Allow no tools.")

    def handle(self, *args: Any, tenant: str, tools: list[str], none: bool, **options: Any) -> None:
        if none == bool(tools):
            raise CommandError("Name the tools to allow, or pass --none (not both).")
        owner = Tenant.objects.filter(slug=tenant).first()
        if owner is None:
            raise CommandError(f"No tenant with slug `{tenant}`.")
        try:
            access = tools_allow(tenant=owner, tools=tools)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        allowed = ", ".join(access.allowed()) or "none"
        self.stdout.write(f"Tools allowed to tenant {owner.slug}: {allowed}.")
