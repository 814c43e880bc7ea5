"""Reads of the tools app."""

from __future__ import annotations

from django.db.models import QuerySet

from apps.tools.models import ToolRun


def tool_run_list(*, tenant_id: int, limit: int, offset: int, tool: str | None = None) -> list:
    runs: QuerySet[ToolRun] = ToolRun.objects.filter(tenant_id=tenant_id)
    if tool:
        runs = runs.filter(tool=tool)
    return list(runs.select_related("api_key")[offset : offset + limit])
