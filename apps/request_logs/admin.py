from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import path

from apps.core.admin import ReadOnlyAdminMixin
from apps.core.charts import Chart, Frame, Series, bar_chart, line_chart
from apps.request_logs.dashboard import hourly, top_tenants
from apps.request_logs.models import RequestLog
from apps.request_logs.writer import LOG_COLUMNS

# The columns the writer stores, in its order; these show as something more readable.
SHOWN_AS = {"tenant_id": "tenant", "api_key_id": "key", "ttft_ms": "ttft", "latency_ms": "latency"}
ON_ITS_PAGE = {**SHOWN_AS, "api_key_id": "api_key"}  # the key links to its page there


def milliseconds(value: float | None) -> str:
    return "-" if value is None else f"{round(value)} ms"


@admin.register(RequestLog)
class RequestLogAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    """Read-only: logs are written by the gateway; superusers may delete old ones."""

    superusers_may_delete = True
    list_display = [SHOWN_AS.get(column, column) for column in LOG_COLUMNS]
    fields = [ON_ITS_PAGE.get(column, column) for column in LOG_COLUMNS]
    readonly_fields = ["ttft", "latency"]
    list_filter = [
        "tenant",
        "status_code",
        "endpoint",
        "stream",
        "client_disconnected",
        "safety_action",
    ]
    list_select_related = ["tenant", "api_key"]
    search_fields = ["model", "engine", "tenant__slug"]
    date_hierarchy = "created_at"
    show_full_result_count = False  # skip a COUNT(*) over the whole table

    @admin.display(description="API key", ordering="api_key__name")
    def key(self, obj: RequestLog) -> str:
        return obj.api_key.name if obj.api_key else "-"

    @admin.display(description="time to first token", ordering="ttft_ms")
    def ttft(self, obj: RequestLog) -> str:
        return milliseconds(obj.ttft_ms)

    @admin.display(description="latency", ordering="latency_ms")
    def latency(self, obj: RequestLog) -> str:
        return milliseconds(obj.latency_ms)

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


DASHBOARD_FRAME = Frame(width=520, height=200, left=48, right=8, top=10, bottom=24, label_gap=4)
NO_REQUESTS = "No requests in these hours."


def hour_bars(name: str, title: str, labels: list[str], css: str, values: list[float]) -> Chart:
    """One bar per hour, titled "14:00: 5 requests"."""
    return bar_chart(
        id=f"chart-{name}", css="dash-chart", title=title, frame=DASHBOARD_FRAME,
        labels=labels, series=[Series(name, css, values)], empty_text=NO_REQUESTS,
    )  # fmt: skip


def dashboard_context() -> dict[str, Any]:
    hours = hourly(hours=24)
    labels = [f"{hour.start:%H}:00" for hour in hours]
    charts = [
        hour_bars("requests", "Requests per hour", labels, "bar", [h.requests for h in hours]),
        hour_bars(
            "tokens", "Tokens per hour (prompt + completion)", labels, "bar",
            [h.tokens for h in hours],
        ),
        line_chart(
            id="chart-latency", css="dash-chart", title="Latency per hour (ms): p50 and p95",
            frame=DASHBOARD_FRAME, labels=labels, empty_text=NO_REQUESTS,
            series=[Series("p50", "p50", [h.p50_ms for h in hours]),
                    Series("p95", "p95", [h.p95_ms for h in hours])],
        ),
        hour_bars(
            "errors", "Errors per hour (status 400 and above)", labels, "bar error",
            [h.errors for h in hours],
        ),
    ]  # fmt: skip
    return {
        "charts": charts,
        "tenants": top_tenants(hours=24),
        "total_requests": sum(h.requests for h in hours),
        "total_errors": sum(h.errors for h in hours),
        "total_tokens": sum(h.tokens for h in hours),
    }
