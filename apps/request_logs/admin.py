from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

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

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.is_superuser
