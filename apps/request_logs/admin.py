from __future__ import annotations

from django.contrib import admin

from apps.core.admin import ReadOnlyAdminMixin
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
    list_filter = ["tenant", "status_code", "endpoint", "stream", "client_disconnected"]
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
