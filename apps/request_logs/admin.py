from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import path

from apps.request_logs.charts import hour_chart
from apps.request_logs.dashboard import hourly, top_tenants
from apps.request_logs.models import RequestLog


@admin.register(RequestLog)
class RequestLogAdmin(admin.ModelAdmin):
    """Read-only: logs are written by the gateway; superusers may delete old ones."""

    list_display = [
        "created_at",
        "tenant",
        "key",
        "endpoint",
        "model",
        "engine",
        "stream",
        "status_code",
        "error_code",
        "prompt_tokens",
        "cached_tokens",
        "completion_tokens",
        "ttft_ms",
        "latency_ms",
        "client_disconnected",
        "usage_estimated",
    ]
    list_filter = ["tenant", "status_code", "endpoint", "stream", "client_disconnected"]
    list_select_related = ["tenant", "api_key"]
    search_fields = ["model", "engine", "tenant__slug"]
    date_hierarchy = "created_at"
    show_full_result_count = False  # skip a COUNT(*) over the whole table

    @admin.display(description="API key", ordering="api_key__name")
    def key(self, obj: RequestLog) -> str:
        return obj.api_key.name if obj.api_key else "-"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def get_urls(self) -> list:
        view = self.admin_site.admin_view(self.dashboard_view)
        return [path("dashboard/", view, name="request_logs_dashboard"), *super().get_urls()]

    def dashboard_view(self, request: HttpRequest) -> HttpResponse:
        """Charts of the last 24 hours from the request logs (staff with view permission)."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "title": "Dashboard: the last 24 hours",
            **dashboard_context(),
        }
        return TemplateResponse(request, "admin/request_logs/dashboard.html", context)

    def changelist_view(self, request: HttpRequest, extra_context: dict | None = None) -> Any:
        extra = {**(extra_context or {}), "dashboard_url": "dashboard/"}
        return super().changelist_view(request, extra_context=extra)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.is_superuser


def dashboard_context() -> dict[str, Any]:
    hours = hourly(hours=24)
    labels = [f"{hour.start:%H}:00" for hour in hours]
    charts = [
        hour_chart(
            id="requests", title="Requests per hour", labels=labels,
            series=[("requests", "bar", [h.requests for h in hours])],
        ),
        hour_chart(
            id="tokens", title="Tokens per hour (prompt + completion)", labels=labels,
            series=[("tokens", "bar", [h.tokens for h in hours])],
        ),
        hour_chart(
            id="latency", title="Latency per hour (ms): p50 and p95", labels=labels,
            series=[("p50", "p50", [h.p50_ms for h in hours]),
                    ("p95", "p95", [h.p95_ms for h in hours])],
        ),
        hour_chart(
            id="errors", title="Errors per hour (status 400 and above)", labels=labels,
            series=[("errors", "bar error", [h.errors for h in hours])],
        ),
    ]  # fmt: skip
    return {
        "charts": charts,
        "tenants": top_tenants(hours=24),
        "total_requests": sum(h.requests for h in hours),
        "total_errors": sum(h.errors for h in hours),
        "total_tokens": sum(h.tokens for h in hours),
    }
