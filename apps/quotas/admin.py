from __future__ import annotations

from datetime import date
from decimal import Decimal
from typing import Any

from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.db.models import Q, QuerySet, Sum
from django.db.models.functions import Coalesce
from django.http import Http404, HttpRequest
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.html import format_html

from apps.core.admin import ReadOnlyAdminMixin
from apps.core.charts import Chart, Frame, Series, bar_chart
from apps.quotas.costs import money
from apps.quotas.models import Quota, QuotaWindow, Reservation, Unit, Usage
from apps.quotas.selectors import (
    USAGE_DAYS,
    DayUsage,
    quota_state,
    quota_states,
    quotas_with_current_window,
    spend_by_day,
    spend_per_day,
    usage_by_day,
    usage_by_kind,
    usage_since,
    usage_totals,
)
from apps.quotas.state import QuotaState, describe_reset
from apps.tenants.models import ApiKey, Tenant


def usage_url(tenant_id: int) -> str:
    return reverse("admin:quotas_usage_tenant", args=[tenant_id])


def quota_row(state: QuotaState) -> dict[str, Any]:
    """A quota's state with the widths (%) of its used and reserved bar segments."""
    limit = max(1, state.limit)
    used_pct = min(100.0, state.used * 100 / limit)
    reserved_pct = min(100.0 - used_pct, state.reserved * 100 / limit)
    return {
        "state": state,
        "reset": describe_reset(state),
        "used_pct": f"{used_pct:.1f}",
        "reserved_pct": f"{reserved_pct:.1f}",
        "full": state.remaining == 0,
    }


class ScopeFilter(admin.SimpleListFilter):
    title = "scope"
    parameter_name = "scope"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("tenant", "whole tenant"), ("key", "one API key")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Quota]) -> QuerySet[Quota]:
        if self.value() == "tenant":
            return queryset.filter(api_key__isnull=True)
        if self.value() == "key":
            return queryset.filter(api_key__isnull=False)
        return queryset


@admin.register(Quota)
class QuotaAdmin(admin.ModelAdmin):
    """Quotas with the live state of their current window (one query for the whole page)."""

    list_display = [
        "tenant",
        "scope",
        "period",
        "limit",
        "used",
        "reserved",
        "remaining",
        "resets_at",
        "usage",
    ]
    list_filter = ["period", ScopeFilter, "tenant"]
    list_select_related = ["tenant", "api_key"]
    search_fields = ["tenant__slug", "api_key__name"]
    live_fields = ["used", "reserved", "remaining", "resets_at"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Quota]:
        quotas = super().get_queryset(request).filter(unit=Unit.TOKENS)  # budgets: BudgetAdmin
        return quotas_with_current_window(quotas, now=timezone.now())

    def get_fields(self, request: HttpRequest, obj: Quota | None = None) -> list[str]:
        fields = ["tenant", "api_key", "period", "limit_tokens"]
        return [*fields, *self.live_fields] if obj else fields

    def get_readonly_fields(self, request: HttpRequest, obj: Quota | None = None) -> list[str]:
        # Moving a quota to another scope or period would carry its usage over: only the
        # limit changes; delete and add for anything else.
        return ["tenant", "api_key", "period", *self.live_fields] if obj else []

    def formfield_for_foreignkey(self, db_field: Any, request: HttpRequest, **kwargs: Any) -> Any:
        if db_field.name == "api_key":
            kwargs["queryset"] = ApiKey.objects.select_related("tenant")
        return super().formfield_for_foreignkey(db_field, request, **kwargs)

    @admin.display(description="limit", ordering="limit_tokens")
    def limit(self, obj: Quota) -> str:
        return f"{obj.limit_tokens:,}"

    @admin.display(description="used")
    def used(self, obj: Quota) -> str:
        return f"{quota_state(obj).used:,}"

    @admin.display(description="reserved")
    def reserved(self, obj: Quota) -> str:
        return f"{quota_state(obj).reserved:,}"

    @admin.display(description="remaining")
    def remaining(self, obj: Quota) -> str:
        return f"{quota_state(obj).remaining:,}"

    @admin.display(description="resets")
    def resets_at(self, obj: Quota) -> str:
        return describe_reset(quota_state(obj))

    @admin.display(description="usage")
    def usage(self, obj: Quota) -> str:
        return format_html('<a href="{}">usage of {}</a>', usage_url(obj.tenant_id), obj.tenant)


@admin.register(QuotaWindow)
class QuotaWindowAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    """Windows are written only by reservations and settlements."""

    list_display = ["quota", "window_start", "used_tokens", "reserved_tokens"]
    list_filter = ["quota__period", "quota__tenant"]
    list_select_related = ["quota__tenant", "quota__api_key"]
    search_fields = ["quota__tenant__slug", "quota__api_key__name"]
    date_hierarchy = "window_start"
    show_full_result_count = False


@admin.register(Reservation)
class ReservationAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    """Requests in flight. Deleting one here would leak its tokens, hence read-only; stale
    ones are released by the sweep (`release_stale_reservations`), which sets released_at."""

    list_display = ["id", "tenant", "api_key", "tokens", "created_at", "released_at"]
    list_filter = ["tenant", ("released_at", admin.EmptyFieldListFilter)]
    list_select_related = ["tenant", "api_key__tenant"]


@admin.register(Usage)
class UsageAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    """The admin index entry "Usage by tenant": tenants, each linking to its usage page."""

    list_display = ["slug", "name", "active", "tokens_last_30_days", "usage"]
    list_display_links = None
    search_fields = ["slug", "name"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Tenant]:
        recent = Q(request_logs__created_at__gte=usage_since(days=USAGE_DAYS))
        return (
            super()
            .get_queryset(request)
            .annotate(
                recent_prompt=Coalesce(Sum("request_logs__prompt_tokens", filter=recent), 0),
                recent_completion=Coalesce(
                    Sum("request_logs__completion_tokens", filter=recent), 0
                ),
            )
        )

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # Anyone who may see quotas or tenants may see their usage.
        return super().has_view_permission(request, obj) or request.user.has_perm(
            "quotas.view_quota"
        )

    @admin.display(description=f"tokens, last {USAGE_DAYS} days")
    def tokens_last_30_days(self, obj: Tenant) -> str:
        return f"{obj.recent_prompt + obj.recent_completion:,}"

    @admin.display(description="usage")
    def usage(self, obj: Tenant) -> str:
        return format_html('<a href="{}">Usage</a>', usage_url(obj.pk))

    def get_urls(self) -> list[URLPattern]:
        usage_page = path(
            "<int:tenant_id>/",
            self.admin_site.admin_view(self.usage_view),
            name="quotas_usage_tenant",
        )
        return [usage_page, *super().get_urls()]

    def usage_view(self, request: HttpRequest, tenant_id: int) -> TemplateResponse:
        """One tenant, or one of its API keys (`?key=<id>`): tokens per day (chart), totals
        per key, and the state of each quota that applies."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        tenant = get_object_or_404(Tenant, pk=tenant_id)
        key = selected_key(request, tenant)
        key_id = key.pk if key is not None else None
        days = usage_by_day(tenant_id=tenant.pk, api_key_id=key_id)
        keys = usage_totals(tenant_id=tenant.pk, api_key_id=key_id)
        quotas = quota_states(tenant_id=tenant.pk, api_key_id=key_id)
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "title": f"Usage of {tenant.slug}" + (f", key {key.name}" if key else ""),
            "tenant": tenant,
            "key": key,
            "tenant_keys": list(tenant.api_keys.order_by("name").values_list("pk", "name")),
            "days": USAGE_DAYS,
            "chart": usage_chart(days, key_name=key.name if key else None),
            "keys": keys,
            "kinds": usage_by_kind(tenant_id=tenant.pk, api_key_id=key_id),
            "total_prompt": sum(day.prompt_tokens for day in days),
            "total_completion": sum(day.completion_tokens for day in days),
            "total_requests": sum(key.requests for key in keys),
            "quotas": [quota_row(state) for state in quotas],
            **spend_context(
                tenant_id=tenant.pk, api_key_id=key_id, key_name=key.name if key else None
            ),
        }
        return TemplateResponse(request, "admin/quotas/usage.html", context)


def spend_context(
    *, tenant_id: int, api_key_id: int | None, key_name: str | None = None
) -> dict[str, Any]:
    """Money on the usage page: spend per day (chart), per day/key/model, the budgets."""
    spend = spend_by_day(tenant_id=tenant_id, api_key_id=api_key_id)
    budgets = quota_states(tenant_id=tenant_id, api_key_id=api_key_id, unit=Unit.COST)
    return {
        "spend": spend,
        "spend_chart": spend_chart(spend_per_day(spend), key_name=key_name),
        "spend_total": sum((row.cost for row in spend), Decimal(0)),
        "budgets": [
            {
                "state": state,
                "amount": money(state.limit),
                "spent": money(state.used),
                "reserved": money(state.reserved),
                "left": money(state.remaining),
                "reset": describe_reset(state),
            }
            for state in budgets
        ],
    }


USAGE_FRAME = Frame(width=760, height=260, left=56, right=12, top=12, bottom=28)


def usage_chart(days: list[DayUsage], *, key_name: str | None) -> Chart:
    """Stacked bars per day: prompt tokens at the bottom, completion tokens on top."""
    of_key = f" of key {key_name}" if key_name else ""
    return bar_chart(
        id="usage-chart", css="usage-chart", frame=USAGE_FRAME, legend=True,
        title=f"Prompt and completion tokens per day{of_key}, last {len(days)} days",
        labels=[day_label(day.day) for day in days],
        series=[Series("prompt tokens", "prompt", [day.prompt_tokens for day in days]),
                Series("completion tokens", "completion", [day.completion_tokens for day in days])],
        titles=[f"{day.day.isoformat()}: {day.prompt_tokens:,} prompt + "
                f"{day.completion_tokens:,} completion tokens" for day in days],
        empty_text="There were no requests in this period.",
    )  # fmt: skip


def spend_chart(days: list[tuple[date, Decimal]], *, key_name: str | None) -> Chart:
    """Bars of money spent per day; the axis keeps the amounts' decimals (no "1.5k")."""
    return bar_chart(
        id="spend-chart", css="usage-chart", frame=USAGE_FRAME,
        title=f"Money spent per day{f' by key {key_name}' if key_name else ''}, "
              f"last {len(days)} days",
        labels=[day_label(day) for day, _ in days],
        series=[Series("spent", "spend", [float(cost) for _, cost in days])],
        titles=[f"{day.isoformat()}: {cost:f}" for day, cost in days],
        ticks=lambda value: f"{value:g}",
        empty_text="Nothing spent on priced models in this period.",
    )  # fmt: skip


def day_label(day: date) -> str:
    return f"{day:%b} {day.day}"  # "Nov 3": no zero padding


def selected_key(request: HttpRequest, tenant: Tenant) -> ApiKey | None:
    """The API key the usage page is narrowed to (`?key=<id>`); 404 for anything that is
    not one of this tenant's keys, so another tenant's key names never show."""
    raw = request.GET.get("key", "")
    if not raw:
        return None
    if not raw.isdigit():
        raise Http404("No such API key.")
    return get_object_or_404(ApiKey, pk=int(raw), tenant=tenant)


from apps.quotas import budgets_admin  # noqa: E402, F401  (registers prices and budgets)
