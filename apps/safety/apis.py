"""GET /api/safety-events: a tenant's own safety events, newest first (thin view)."""

from __future__ import annotations

from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response

from apps.safety.models import Action, SafetyEvent, Stage
from apps.safety.selectors import event_list
from apps.tenants.api_auth import TenantApiView

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500


class EventQuery(serializers.Serializer):
    stage = serializers.ChoiceField(choices=Stage.choices, required=False)
    action = serializers.ChoiceField(choices=Action.choices, required=False)
    rule = serializers.CharField(required=False, max_length=100)
    search = serializers.CharField(required=False, max_length=200)
    since = serializers.DateTimeField(required=False)
    limit = serializers.IntegerField(
        min_value=1, max_value=MAX_PAGE_SIZE, default=DEFAULT_PAGE_SIZE
    )
    offset = serializers.IntegerField(min_value=0, default=0)


class EventOutput(serializers.ModelSerializer):
    rule = serializers.CharField(source="rule_name")
    api_key = serializers.CharField(source="api_key.name", default=None)

    class Meta:
        model = SafetyEvent
        fields = [
            "id",
            "created_at",
            "stage",
            "rule",
            "action",
            "categories",
            "excerpt",
            "detail",
            "session_id",
            "request_id",
            "api_key",
        ]


class SafetyEventListApi(TenantApiView):
    def get(self, request: Request) -> Response:
        query = EventQuery(data=request.query_params)
        query.is_valid(raise_exception=True)
        params = dict(query.validated_data)
        limit, offset = params.pop("limit"), params.pop("offset")
        events = list(
            event_list(tenant_id=self.principal.tenant.pk, **params)[offset : offset + limit + 1]
        )
        return Response(
            {
                "object": "list",
                "data": EventOutput(events[:limit], many=True).data,
                "limit": limit,
                "offset": offset,
                "has_more": len(events) > limit,
            }
        )
