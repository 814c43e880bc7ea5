"""Admin: the per-tenant tool allow-list (editable in the list) and the tool runs
(read-only, filterable); both pages say which sandbox runs the tools."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.http import HttpRequest, HttpResponse

from apps.core.admin import ReadOnlyAdminMixin
from apps.tools.models import ToolAccess, ToolRun
from apps.tools.sandbox.config import describe_sandbox


class SandboxNotice:
    """Shows the sandbox in use (and the weaker rlimits-only mode) above the list."""

    def changelist_view(self, request: HttpRequest, extra_context: Any = None) -> HttpResponse:
        level = (
            messages.WARNING
            if describe_sandbox().startswith(("Unavailable", "rlimits"))
            else messages.INFO
        )
        messages.add_message(request, level, f"Tools sandbox: {describe_sandbox()}")
        return super().changelist_view(request, extra_context)


@admin.register(ToolAccess)
class ToolAccessAdmin(SandboxNotice, admin.ModelAdmin):
    list_display = ["tenant", "python", "bash", "web_search"]
    list_editable = ["python", "bash", "web_search"]
    list_filter = ["python", "bash", "web_search"]
    search_fields = ["tenant__slug", "tenant__name"]
    autocomplete_fields = ["tenant"]


@admin.register(ToolRun)
class ToolRunAdmin(SandboxNotice, ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = [
        "created_at",
        "tenant",
        "api_key",
        "tool",
        "short_command",
        "exit_code",
        "duration",
        "limits",
        "blocked_by_safety",
    ]
    list_filter = ["tool", "blocked_by_safety", "timed_out", "backend", "tenant", "created_at"]
    search_fields = ["command_excerpt", "session_id", "tenant__slug"]
    date_hierarchy = "created_at"
    list_select_related = ["tenant", "api_key"]

    superusers_may_delete = True  # old records

    @admin.display(description="command")
    def short_command(self, obj: ToolRun) -> str:
        text = " ".join(obj.command_excerpt.split())
        return text if len(text) <= 80 else text[:79] + "…"

    @admin.display(description="duration", ordering="duration_ms")
    def duration(self, obj: ToolRun) -> str:
        return f"{obj.duration_ms:.0f} ms"

    @admin.display(description="limits hit")
    def limits(self, obj: ToolRun) -> str:
        return ", ".join(obj.limits_hit) or "-"
