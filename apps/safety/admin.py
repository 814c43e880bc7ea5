from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin
from django.core.exceptions import ValidationError
from django.db.models import QuerySet
from django.http import HttpRequest

from apps.core.charts import Column, Series, bar_table
from apps.safety.models import SafetyEvent, SafetyRule
from apps.safety.presets import PRESETS
from apps.safety.selectors import events_per_day_per_rule
from apps.safety.services import preset_pattern, rule_try

TEST_BUTTON = "_test_rule"


class SafetyRuleForm(forms.ModelForm):
    preset = forms.ChoiceField(
        required=False,
        choices=[("", "—"), *((p.key, p.label) for p in PRESETS.values())],
        help_text="Fill the pattern from a built-in preset (replaces what is typed above).",
    )
    sample_text = forms.CharField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 3}),
        label="Test this rule",
        help_text="Type a sample text and press “Test this rule”: the result shows here; "
        "nothing is saved.",
    )

    class Meta:
        model = SafetyRule
        fields = [
            "name",
            "description",
            "enabled",
            "stage",
            "action",
            "tenant",
            "api_key",
            "kind",
            "pattern",
            "flags",
            "replacement",
            "classifier_model",
            "categories",
            "fail_open",
        ]

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        if data.get("preset"):
            data["pattern"], data["flags"] = preset_pattern(data["preset"])
        return data

    def _post_clean(self) -> None:
        super()._post_clean()  # the model's validation: RE2 compiles the pattern
        if TEST_BUTTON in self.data and not self.errors:
            result = rule_try(rule=self.instance, text=self.cleaned_data.get("sample_text") or "")
            # Shown under the box; an error also keeps the admin from saving.
            self.add_error("sample_text", ValidationError(f"Test result (not saved): {result}"))


@admin.register(SafetyRule)
class SafetyRuleAdmin(admin.ModelAdmin):
    form = SafetyRuleForm
    change_form_template = "admin/safety/safetyrule/change_form.html"
    list_display = ("name", "stage", "kind", "action", "scope", "enabled", "updated_at")
    list_filter = ("stage", "kind", "action", "enabled", "tenant")
    search_fields = ("name", "pattern", "classifier_model", "description")
    list_editable = ("enabled",)
    fieldsets = (
        (None, {"fields": ("name", "description", "enabled", "stage", "action")}),
        ("Scope", {"fields": ("tenant", "api_key")}),
        ("Regex (RE2)", {"fields": ("kind", "pattern", "flags", "preset", "replacement")}),
        ("Classifier model", {"fields": ("classifier_model", "categories", "fail_open")}),
        ("Test", {"fields": ("sample_text",)}),
    )

    @admin.display(description="scope")
    def scope(self, rule: SafetyRule) -> str:
        if rule.tenant_id is None:
            return "global"
        return rule.tenant.slug + (f" / {rule.api_key.name}" if rule.api_key_id else "")

    def get_queryset(self, request: HttpRequest) -> QuerySet[SafetyRule]:
        return super().get_queryset(request).select_related("tenant", "api_key")


@admin.register(SafetyEvent)
class SafetyEventAdmin(admin.ModelAdmin):
    change_list_template = "admin/safety/safetyevent/change_list.html"
    list_display = ("created_at", "tenant", "stage", "rule_name", "action", "categories", "excerpt")
    list_filter = ("stage", "action", "rule_name", "tenant", "created_at")
    search_fields = ("rule_name", "excerpt", "detail", "session_id", "request_id")
    date_hierarchy = "created_at"
    list_select_related = ("tenant",)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # the audit trail is written by the gateway only

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def changelist_view(self, request: HttpRequest, extra_context: dict | None = None) -> Any:
        response = super().changelist_view(request, extra_context)
        changelist = getattr(response, "context_data", {}).get("cl")
        if changelist is not None:
            # The chart follows the filters and the search of the list below it.
            response.context_data["chart"] = day_chart(changelist.queryset)
        return response


def day_chart(queryset: QuerySet[SafetyEvent]) -> dict[str, Any]:
    """Events per day per rule: a row of bars per rule, the last days as columns."""
    days, per_rule = events_per_day_per_rule(queryset=queryset.order_by())
    table = bar_table(
        css="safety-chart", corner="rule", color="#c0392b",
        columns=[Column(label=f"{day:%d/%m}", title=day.isoformat()) for day in days],
        rows=[Series(rule, "", [counts.get(day, 0) for day in days])
              for rule, counts in sorted(per_rule.items())],
    )  # fmt: skip
    return {"days": days, "table": table}
