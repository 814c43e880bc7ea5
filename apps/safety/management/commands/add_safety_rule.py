from __future__ import annotations

from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from apps.safety.models import Action, Stage
from apps.safety.presets import PRESETS
from apps.safety.services import RuleError, preset_pattern, rule_put
from apps.tenants.models import ApiKey, Tenant


class Command(BaseCommand):
    help = (
        "Add a safety rule, or replace the rule of that name. Regex (RE2) or classifier "
        "model; global unless --tenant. Takes effect within SAFETY_RULES_CACHE_SECONDS."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("name")
        parser.add_argument("--stage", required=True, choices=Stage.values)
        kind = parser.add_mutually_exclusive_group(required=True)
        kind.add_argument("--regex", help="An RE2 pattern.")
        kind.add_argument("--preset", choices=sorted(PRESETS), help="A built-in pattern.")
        kind.add_argument("--model", help="A classifier chat model (Llama Guard style).")
        parser.add_argument("--categories", default="", help="S1,S2,...: what the model blocks.")
        parser.add_argument("--action", default=Action.BLOCK, choices=Action.values)
        parser.add_argument("--flags", default="", help="RE2 flags: i, m, s.")
        parser.add_argument("--replacement", help="What redact puts in place ([REDACTED]).")
        parser.add_argument("--tenant", help="Only this tenant (slug).")
        parser.add_argument("--api-key-name", help="Only this key of --tenant.")
        fail = parser.add_mutually_exclusive_group()
        fail.add_argument("--fail-open", dest="fail_open", action="store_true", default=None)
        fail.add_argument("--fail-closed", dest="fail_open", action="store_false")

    def handle(self, *args: Any, **options: Any) -> None:
        tenant, api_key = _scope(options["tenant"], options["api_key_name"])
        pattern, flags = options["regex"] or "", options["flags"]
        try:
            if options["preset"]:
                pattern, preset_flags = preset_pattern(options["preset"])
                flags = flags or preset_flags
            rule, created = rule_put(
                name=options["name"],
                stage=options["stage"],
                action=options["action"],
                pattern=pattern,
                flags=flags,
                classifier_model=options["model"] or "",
                categories=options["categories"],
                tenant=tenant,
                api_key=api_key,
                fail_open=options["fail_open"],
                replacement=options["replacement"],
            )
        except RuleError as exc:
            raise CommandError(f"Rule {options['name']} not saved: {exc}") from None
        scope = f"tenant {tenant.slug}" if tenant else "every tenant"
        if api_key is not None:
            scope += f", key {api_key.name}"
        verb = "Added" if created else "Replaced"
        self.stdout.write(f"{verb} {rule.action} rule {rule.name} ({rule.stage}) for {scope}.")


def _scope(slug: str | None, key_name: str | None) -> tuple[Tenant | None, ApiKey | None]:
    if slug is None:
        if key_name is not None:
            raise CommandError("--api-key-name needs --tenant.")
        return None, None
    tenant = Tenant.objects.filter(slug=slug).first()
    if tenant is None:
        raise CommandError(f"No tenant {slug!r}.")
    if key_name is None:
        return tenant, None
    api_key = ApiKey.objects.filter(tenant=tenant, name=key_name).first()
    if api_key is None:
        raise CommandError(f"Tenant {slug!r} has no API key named {key_name!r}.")
    return tenant, api_key
