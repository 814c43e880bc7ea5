"""Tenant REST API: the calling tenant's quotas and token usage (thin view)."""

from __future__ import annotations

from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response

from apps.quotas.selectors import USAGE_DAYS, quota_states, usage_by_day, usage_totals
from apps.quotas.state import QuotaState
from apps.tenants.api_auth import TenantApiView


class QuotaOutput(serializers.Serializer):
    scope = serializers.CharField()
    period = serializers.CharField()
    limit = serializers.IntegerField()
    used = serializers.IntegerField()
    reserved = serializers.IntegerField()
    remaining = serializers.IntegerField()
    resets_at = serializers.DateTimeField(allow_null=True)
    applies_to_this_key = serializers.SerializerMethodField()

    def get_applies_to_this_key(self, state: QuotaState) -> bool:
        return state.scope in ("tenant", f"key {self.context['key_name']}")


class DayOutput(serializers.Serializer):
    date = serializers.DateField(source="day")
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    total_tokens = serializers.IntegerField()


class KeyOutput(serializers.Serializer):
    name = serializers.CharField()
    requests = serializers.IntegerField()
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    total_tokens = serializers.IntegerField()


class UsageApi(TenantApiView):
    """GET /api/usage: every quota of the caller's tenant (the tightest first, each marked
    whether it limits the calling key), tokens per UTC day over the last 30 days, totals
    per key, and the rate limits. Only ever the caller's own tenant."""

    def get(self, request: Request) -> Response:
        tenant, api_key = self.principal.tenant, self.principal.api_key
        states = quota_states(tenant_id=tenant.pk)
        context = {"key_name": api_key.name}
        return Response(
            {
                "object": "usage",
                "tenant": tenant.slug,
                "api_key": api_key.name,
                "days": USAGE_DAYS,
                "rate_limits": {
                    "tenant_requests_per_minute": tenant.requests_per_minute,
                    "key_requests_per_minute": api_key.requests_per_minute,
                },
                "quotas": QuotaOutput(states, many=True, context=context).data,
                "usage_by_day": DayOutput(usage_by_day(tenant_id=tenant.pk), many=True).data,
                "usage_by_key": KeyOutput(usage_totals(tenant_id=tenant.pk), many=True).data,
            }
        )
