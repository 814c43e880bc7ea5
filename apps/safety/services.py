"""Writing safety rules (commands and admin go through the model's validation)."""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.db import transaction

from apps.safety.checks import excerpt, redact_all
from apps.safety.classifier import try_classifier
from apps.safety.models import Kind, SafetyRule
from apps.safety.presets import PRESETS
from apps.safety.rules import rule_view
from apps.tenants.models import ApiKey, Tenant


class RuleError(ValueError):
    """The rule cannot be saved; the message says why in one line."""


@transaction.atomic
def rule_put(
    *,
    name: str,
    stage: str,
    action: str,
    pattern: str = "",
    flags: str = "",
    classifier_model: str = "",
    categories: str = "",
    tenant: Tenant | None = None,
    api_key: ApiKey | None = None,
    fail_open: bool | None = None,
    replacement: str | None = None,
    description: str = "",
) -> tuple[SafetyRule, bool]:
    """Create the rule NAME, or replace the one of that name; (rule, created)."""
    rule = SafetyRule.objects.select_for_update().filter(name=name).first()
    created = rule is None
    rule = rule or SafetyRule(name=name)
    rule.stage, rule.action, rule.tenant, rule.api_key = stage, action, tenant, api_key
    rule.kind = Kind.MODEL if classifier_model else Kind.REGEX
    rule.pattern, rule.flags = pattern, flags
    rule.classifier_model, rule.categories = classifier_model, categories
    rule.fail_open, rule.description, rule.enabled = fail_open, description, True
    if replacement is not None:
        rule.replacement = replacement
    try:
        rule.full_clean()
    except ValidationError as exc:
        raise RuleError(_one_line(exc)) from None
    rule.save()
    return rule, created


def preset_pattern(key: str) -> tuple[str, str]:
    try:
        preset = PRESETS[key]
    except KeyError:
        raise RuleError(f"Unknown preset {key!r}; choose one of {', '.join(PRESETS)}.") from None
    return preset.pattern, preset.flags


def rule_remove(*, name: str) -> bool:
    deleted, _ = SafetyRule.objects.filter(name=name).delete()
    return bool(deleted)


def _one_line(exc: ValidationError) -> str:
    if hasattr(exc, "message_dict"):
        return "; ".join(
            f"{field}: {' '.join(messages)}" if field != "__all__" else " ".join(messages)
            for field, messages in exc.message_dict.items()
        )
    return " ".join(exc.messages)


def rule_try(*, rule: SafetyRule, text: str) -> str:
    """What the (validated, maybe unsaved) rule would do to `text`, in one line."""
    built = rule_view(rule)
    if built is None:
        return "The pattern does not compile."
    if built.kind == Kind.MODEL:
        return try_classifier(rule=built, text=text)
    assert built.regex is not None
    found = built.regex.search(text)
    if found is None:
        return "No match: the text would pass unchanged."
    matched = excerpt(text, *found.span())
    if rule.action == "block":
        return f"Blocked: matches “{found.group(0)[:100]}” (in “{matched}”)."
    if rule.action == "redact":
        return f"Redacted to: “{redact_all(built, text)[:300]}”."
    return f"Passes, flagged: matches “{found.group(0)[:100]}”."
