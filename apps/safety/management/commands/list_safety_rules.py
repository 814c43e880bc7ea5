from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from apps.safety.models import Kind, SafetyRule


class Command(BaseCommand):
    help = "List the safety rules: name, stage, kind, action, scope, what it looks for."

    def handle(self, *args: Any, **options: Any) -> None:
        rules = SafetyRule.objects.select_related("tenant", "api_key").order_by("stage", "name")
        if not rules:
            self.stdout.write("No safety rules.")
            return
        for rule in rules:
            scope = rule.tenant.slug if rule.tenant else "global"
            if rule.api_key:
                scope += f"/{rule.api_key.name}"
            if rule.kind == Kind.REGEX:
                what = f"regex {rule.pattern!r}" + (f" flags {rule.flags}" if rule.flags else "")
            else:
                what = f"model {rule.classifier_model}"
                what += f" categories {rule.categories}" if rule.categories else " any category"
                what += " fail-open" if rule.fails_open else " fail-closed"
            state = "" if rule.enabled else " (disabled)"
            self.stdout.write(f"{rule.name}\t{rule.stage}\t{rule.action}\t{scope}\t{what}{state}")
