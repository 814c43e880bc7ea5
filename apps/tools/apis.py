"""Tenant REST API: the tenant's own tool runs (GET /api/tool-runs)."""

from __future__ import annotations

from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response

from apps.tenants.api_auth import TenantApiView
from apps.tools.models import BUILT_IN_TOOLS, ToolRun
from apps.tools.selectors import tool_run_list

DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100


class ToolRunQuery(serializers.Serializer):
    limit = serializers.IntegerField(
        min_value=1, max_value=MAX_PAGE_SIZE, default=DEFAULT_PAGE_SIZE
    )
    offset = serializers.IntegerField(min_value=0, default=0)
    tool = serializers.ChoiceField(choices=BUILT_IN_TOOLS, required=False)


class ToolRunOutput(serializers.ModelSerializer):
    api_key = serializers.CharField(source="api_key.name", default=None)

    class Meta:
        model = ToolRun
        fields = [
            "id",
            "created_at",
            "api_key",
            "session_id",
            "tool",
            "backend",
            "command_excerpt",
            "exit_code",
            "duration_ms",
            "timed_out",
            "limits_hit",
            "blocked_by_safety",
            "blocked_reason",
            "error",
        ]


class ToolRunListApi(TenantApiView):
    def get(self, request: Request) -> Response:
        query = ToolRunQuery(data=request.query_params)
        query.is_valid(raise_exception=True)
        page = query.validated_data
        runs = tool_run_list(
            tenant_id=self.principal.tenant.pk,
            limit=page["limit"] + 1,  # one extra row says whether there is more
            offset=page["offset"],
            tool=page.get("tool"),
        )
        return Response(
            {
                "object": "list",
                "data": ToolRunOutput(runs[: page["limit"]], many=True).data,
                "limit": page["limit"],
                "offset": page["offset"],
                "has_more": len(runs) > page["limit"],
            }
        )
