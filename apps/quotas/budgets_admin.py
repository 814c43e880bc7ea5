"""Admin for money: model prices and cost budgets (Quota rows with unit=cost)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django import forms
from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils import timezone

from apps.quotas.costs import MAX_BUDGET, money, scaled
from apps.quotas.models import Budget, ModelPrice, Unit
from apps.quotas.selectors import quota_state, quotas_with_current_window
from apps.quotas.services import BUDGET_PERIODS


@admin.register(ModelPrice)
class ModelPriceAdmin(admin.ModelAdmin):
    list_display = [
        "model",
        "input_per_million",
        "output_per_million",
        "cached_input_per_million",
        "updated_at",
    ]
    search_fields = ["model__name"]
    autocomplete_fields = ["model"]


class BudgetForm(forms.ModelForm):
    amount = forms.DecimalField(
        min_value=Decimal("0.000001"),
        max_value=MAX_BUDGET,
        decimal_places=6,
        help_text="Currency units per period (the prices' currency).",
    )
    period = forms.ChoiceField(choices=[(p.value, p.label) for p in BUDGET_PERIODS])

    class Meta:
        model = Budget
        fields = ["tenant", "api_key", "period"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.instance.unit = Unit.COST
        if self.instance.pk:
            self.fields["amount"].initial = money(self.instance.limit_tokens)

    def save(self, commit: bool = True) -> Budget:
        self.instance.unit = Unit.COST
        self.instance.limit_tokens = scaled(self.cleaned_data["amount"])
        return super().save(commit)


@admin.register(Budget)
class BudgetAdmin(admin.ModelAdmin):
    """Cost budgets with the live state of their current window, in currency units."""

    form = BudgetForm
    list_display = ["tenant", "scope", "period", "amount", "spent", "reserved", "left", "resets"]
    list_filter = ["period", "tenant"]
    list_select_related = ["tenant", "api_key"]
    search_fields = ["tenant__slug", "api_key__name"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Budget]:
        return quotas_with_current_window(super().get_queryset(request), now=timezone.now())

    def get_fields(self, request: HttpRequest, obj: Budget | None = None) -> list[str]:
        return ["tenant", "api_key", "period", "amount"]

    def get_readonly_fields(self, request: HttpRequest, obj: Budget | None = None) -> list[str]:
        return ["tenant", "api_key", "period"] if obj else []  # only the amount changes

    @admin.display(description="amount")
    def amount(self, obj: Budget) -> Decimal:
        return money(obj.limit_tokens)

    @admin.display(description="spent")
    def spent(self, obj: Budget) -> Decimal:
        return money(quota_state(obj).used)

    @admin.display(description="reserved")
    def reserved(self, obj: Budget) -> Decimal:
        return money(quota_state(obj).reserved)

    @admin.display(description="left")
    def left(self, obj: Budget) -> Decimal:
        return money(quota_state(obj).remaining)

    @admin.display(description="resets")
    def resets(self, obj: Budget) -> str:
        resets_at = quota_state(obj).resets_at
        return "never" if resets_at is None else f"{resets_at:%Y-%m-%d %H:%M} UTC"
