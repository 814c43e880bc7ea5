"""Tenant REST API: the calling tenant's quotas and token usage (thin view)."""

from __future__ import annotations

from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response

from apps.quotas.costs import money
from apps.quotas.models import Unit
from apps.quotas.selectors import (
    USAGE_DAYS,
    DaySpend,
    quota_states,
    spend_by_day,
    usage_by_day,
    usage_by_kind,
    usage_totals,
)
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


class KindOutput(serializers.Serializer):
    """A kind of call: a /v1 endpoint, or an engine call made for the tenant (RAG
    embeddings, the safety classifier)."""

    kind = serializers.CharField()
    requests = serializers.IntegerField()
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    total_tokens = serializers.IntegerField()


class BudgetOutput(serializers.Serializer):
    """A cost budget's current window in currency units (decimal strings: never floats)."""

    scope = serializers.CharField()
    period = serializers.CharField()
    amount = serializers.SerializerMethodField()
    spent = serializers.SerializerMethodField()
    reserved = serializers.SerializerMethodField()
    remaining = serializers.SerializerMethodField()
    resets_at = serializers.DateTimeField(allow_null=True)
    applies_to_this_key = serializers.SerializerMethodField()

    def get_amount(self, state: QuotaState) -> str:
        return f"{money(state.limit):f}"

    def get_spent(self, state: QuotaState) -> str:
        return f"{money(state.used):f}"

    def get_reserved(self, state: QuotaState) -> str:
        return f"{money(state.reserved):f}"

    def get_remaining(self, state: QuotaState) -> str:
        return f"{money(state.remaining):f}"

    def get_applies_to_this_key(self, state: QuotaState) -> bool:
        return state.scope in ("tenant", f"key {self.context['key_name']}")


class SpendOutput(serializers.Serializer):
    date = serializers.DateField(source="day")
    api_key = serializers.CharField()
    model = serializers.CharField()
    requests = serializers.IntegerField()
    cost = serializers.SerializerMethodField()

    def get_cost(self, row: DaySpend) -> str:
        return f"{row.cost:f}"


class UsageApi(TenantApiView):
    """GET /api/usage: every quota of the caller's tenant (the tightest first, each marked
    whether it limits the calling key), tokens per UTC day over the last 30 days, totals
    per key, the rate limits, the cost budgets and the money spent per day, key and model.
    Only ever the caller's own tenant."""

    def get(self, request: Request) -> Response:
        tenant, api_key = self.principal.tenant, self.principal.api_key
        states = quota_states(tenant_id=tenant.pk)
        budgets = quota_states(tenant_id=tenant.pk, unit=Unit.COST)
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
                "usage_by_kind": KindOutput(usage_by_kind(tenant_id=tenant.pk), many=True).data,
                "budgets": BudgetOutput(budgets, many=True, context=context).data,
                "spend_by_day": SpendOutput(spend_by_day(tenant_id=tenant.pk), many=True).data,
            }
        )
