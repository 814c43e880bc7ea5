"""Safety rules (what to look for, where, and what to do) and the audit trail of what
they did."""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.db import models
from django.utils import timezone

from apps.safety.patterns import BadPattern, compiled, flags_validate

LLAMA_GUARD_CATEGORIES = tuple(f"S{n}" for n in range(1, 15))
EXCERPT_CHARS = 200


class Stage(models.TextChoices):
    PROMPT = "prompt", "Prompt (before the engine)"
    RESPONSE = "response", "Response (whole and streamed)"
    TOOL = "tool", "Tool command (before it runs)"


class Kind(models.TextChoices):
    REGEX = "regex", "Regular expression (RE2)"
    MODEL = "model", "Classifier model (Llama Guard style)"


class Action(models.TextChoices):
    BLOCK = "block", "Block"
    REDACT = "redact", "Redact (regex only)"
    FLAG = "flag", "Flag (log only)"


class SafetyRule(models.Model):
    """A check of one stage, for every tenant (tenant empty), one tenant, or one key."""

    name = models.SlugField(max_length=100, unique=True, help_text="Shown to clients it blocks.")
    description = models.CharField(max_length=300, blank=True)
    tenant = models.ForeignKey(
        "tenants.Tenant",
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="safety_rules",
        help_text="Empty: applies to every tenant.",
    )
    api_key = models.ForeignKey(
        "tenants.ApiKey",
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="safety_rules",
        help_text="Only requests made with this key of the tenant.",
    )
    stage = models.CharField(max_length=10, choices=Stage.choices)
    kind = models.CharField(max_length=10, choices=Kind.choices, default=Kind.REGEX)
    action = models.CharField(max_length=10, choices=Action.choices, default=Action.BLOCK)
    enabled = models.BooleanField(default=True)
    pattern = models.TextField(blank=True, help_text="RE2 syntax (regex rules).")
    flags = models.CharField(
        max_length=3, blank=True, help_text="i: ignore case, m: multi-line, s: dot matches \\n."
    )
    replacement = models.CharField(
        max_length=100, default="[REDACTED]", help_text="What a redact rule puts in place."
    )
    classifier_model = models.CharField(
        max_length=200, blank=True, help_text="A chat model of the gateway (model rules)."
    )
    categories = models.CharField(
        max_length=100,
        blank=True,
        help_text="Comma-separated S1..S14 codes that trigger the rule; empty: any unsafe verdict.",
    )
    fail_open = models.BooleanField(
        null=True,
        blank=True,
        help_text="When the classifier is down: let the text through (yes) or treat it as "
        "unsafe (no). Empty: closed for block rules, open for flag rules.",
    )
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["stage", "name"]

    def __str__(self) -> str:
        return self.name

    @property
    def category_codes(self) -> tuple[str, ...]:
        return tuple(code.strip().upper() for code in self.categories.split(",") if code.strip())

    @property
    def fails_open(self) -> bool:
        if self.fail_open is not None:
            return self.fail_open
        return self.action != Action.BLOCK

    def clean(self) -> None:
        if self.api_key_id and self.api_key.tenant_id != self.tenant_id:
            raise ValidationError({"api_key": "Choose a key of the rule's tenant."})
        if self.kind == Kind.REGEX:
            self._clean_regex()
        else:
            self._clean_model()

    def _clean_regex(self) -> None:
        try:
            self.flags = flags_validate(self.flags)
            regex = compiled(self.pattern, self.flags)
        except BadPattern as exc:
            raise ValidationError({"pattern": f"RE2 cannot compile this pattern: {exc}"}) from None
        if regex.search("") is not None:
            # It would match between every two characters (and redact everything).
            raise ValidationError({"pattern": "This pattern matches empty text."})

    def _clean_model(self) -> None:
        if not self.classifier_model:
            raise ValidationError({"classifier_model": "A model rule needs a classifier model."})
        if self.action == Action.REDACT:
            raise ValidationError({"action": "A classifier can block or flag, not redact."})
        unknown = [c for c in self.category_codes if c not in LLAMA_GUARD_CATEGORIES]
        if unknown:
            raise ValidationError({"categories": f"Unknown categories: {', '.join(unknown)}."})


class SafetyEvent(models.Model):
    """One thing a rule did (or a classifier that could not answer)."""

    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    tenant = models.ForeignKey(
        "tenants.Tenant", on_delete=models.CASCADE, related_name="safety_events"
    )
    api_key = models.ForeignKey(
        "tenants.ApiKey", null=True, on_delete=models.SET_NULL, related_name="safety_events"
    )
    session_id = models.CharField(max_length=200, blank=True)
    request_id = models.CharField(max_length=64, blank=True, db_index=True)
    stage = models.CharField(max_length=10, choices=Stage.choices)
    rule = models.ForeignKey(
        SafetyRule, null=True, on_delete=models.SET_NULL, related_name="events"
    )
    rule_name = models.CharField(max_length=100)  # kept when the rule is deleted
    action = models.CharField(max_length=10, choices=Action.choices)
    categories = models.CharField(max_length=100, blank=True)
    excerpt = models.CharField(max_length=EXCERPT_CHARS, blank=True)
    detail = models.CharField(max_length=300, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["tenant", "-created_at"], name="safety_event_tenant")]

    def __str__(self) -> str:
        return f"{self.rule_name} {self.action} ({self.stage})"
