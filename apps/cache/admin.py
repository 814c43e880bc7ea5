from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from apps.cache.models import CachePolicy
from apps.cache.selectors import cache_stats
from apps.tenants.models import Tenant


@admin.register(CachePolicy)
class CachePolicyAdmin(admin.ModelAdmin):
    list_display = ["__str__", "tenant", "model", "ttl_seconds"]
    list_filter = ["tenant", "model"]
    autocomplete_fields = []
    change_list_template = "admin/response_cache/cachepolicy/change_list.html"

    def changelist_view(self, request: HttpRequest, extra_context: dict | None = None) -> Any:
        """The policies, and below them each tenant's cache figures."""
        rows = []
        for tenant in Tenant.objects.order_by("slug"):
            stats = cache_stats(tenant_id=tenant.pk)
            if stats.hits or stats.misses or stats.bypassed or stats.entries:
                rows.append((tenant, stats))
        return super().changelist_view(
            request, extra_context={**(extra_context or {}), "cache_rows": rows}
        )
