from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.db.models import Count, Q, QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.utils import timezone

from apps.core.admin import ReadOnlyAdminMixin
from apps.tenants.models import ApiKey, Tenant, TenantMembership
from apps.tenants.services import api_key_fill_new, api_key_revoke

ONE_TIME_KEY_MESSAGE = "Copy this key now, it will not be shown again: {raw_key}"


def masked_key(api_key: ApiKey) -> str:
    return f"sk-{api_key.prefix}_…"


def key_status(api_key: ApiKey) -> str:
    if api_key.is_revoked:
        return "revoked"
    if api_key.is_expired():
        return "expired"
    return "active"


class ApiKeyInline(ReadOnlyAdminMixin, admin.TabularInline):
    """The tenant's keys, read-only; each row links to the key's own page."""

    model = ApiKey
    fields = ["name", "prefix", "created_at", "last_used_at", "expires_at", "revoked_at"]
    readonly_fields = fields
    extra = 0
    show_change_link = True
    can_delete = False

    def get_queryset(self, request: HttpRequest) -> QuerySet[ApiKey]:
        return super().get_queryset(request).select_related("tenant")


@admin.register(Tenant)
class TenantAdmin(admin.ModelAdmin):
    list_display = ["slug", "name", "active", "restrict_models", "key_count", "created_at"]
    list_filter = ["active", "restrict_models"]
    search_fields = ["slug", "name"]
    filter_horizontal = ["allowed_models"]
    readonly_fields = ["created_at"]
    inlines = [ApiKeyInline]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Tenant]:
        return super().get_queryset(request).annotate(num_keys=Count("api_keys"))

    @admin.display(description="keys", ordering="num_keys")
    def key_count(self, obj: Tenant) -> int:
        return obj.num_keys


class StatusFilter(admin.SimpleListFilter):
    title = "status"
    parameter_name = "status"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("active", "active"), ("revoked", "revoked"), ("expired", "expired")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> QuerySet[ApiKey]:
        now = timezone.now()
        live = queryset.filter(revoked_at__isnull=True)
        if self.value() == "active":
            return live.filter(Q(expires_at__isnull=True) | Q(expires_at__gt=now))
        if self.value() == "revoked":
            return queryset.filter(revoked_at__isnull=False)
        if self.value() == "expired":
            return live.filter(expires_at__lte=now)
        return queryset


class ApiKeyForm(forms.ModelForm):
    def clean_name(self) -> str:
        # The tenant is read-only on the change form, so Django skips the
        # (tenant, name) constraint there; check it here instead.
        name = self.cleaned_data["name"]
        if "tenant" not in self.fields and self.instance.pk:
            siblings = ApiKey.objects.filter(tenant_id=self.instance.tenant_id, name=name)
            if siblings.exclude(pk=self.instance.pk).exists():
                raise ValidationError("This tenant already has a key with this name.")
        return name


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    form = ApiKeyForm
    list_display = [
        "tenant",
        "name",
        "key",
        "created_at",
        "last_used_at",
        "expires_at",
        "status",
    ]
    list_filter = ["tenant", StatusFilter]
    list_select_related = ["tenant"]
    search_fields = ["name", "prefix", "tenant__slug"]
    actions = ["revoke"]
    add_fields = ["tenant", "name", "expires_at", "requests_per_minute"]
    change_fields = [
        "tenant",
        "name",
        "key",
        "status",
        "created_at",
        "last_used_at",
        "expires_at",
        "requests_per_minute",
        "revoked_at",
    ]
    change_readonly_fields = [
        "tenant",
        "key",
        "status",
        "created_at",
        "last_used_at",
        "revoked_at",
    ]

    def get_fields(self, request: HttpRequest, obj: ApiKey | None = None) -> list[str]:
        return self.change_fields if obj else self.add_fields

    def get_readonly_fields(self, request: HttpRequest, obj: ApiKey | None = None) -> list[str]:
        return self.change_readonly_fields if obj else []

    @admin.display(description="key", ordering="prefix")
    def key(self, obj: ApiKey) -> str:
        return masked_key(obj)

    @admin.display(description="status")
    def status(self, obj: ApiKey) -> str:
        return key_status(obj)

    def save_model(self, request: HttpRequest, obj: ApiKey, form: Any, change: bool) -> None:
        if change:
            super().save_model(request, obj, form, change)
            return
        raw_key = api_key_fill_new(api_key=obj)
        super().save_model(request, obj, form, change)
        messages.success(request, ONE_TIME_KEY_MESSAGE.format(raw_key=raw_key))

    def response_change(self, request: HttpRequest, obj: ApiKey) -> HttpResponse:
        if "_revoke" not in request.POST:
            return super().response_change(request, obj)
        api_key_revoke(api_key=obj)
        messages.success(request, f"Revoked {obj}; it stops working within seconds.")
        return HttpResponseRedirect(request.path)

    @admin.action(description="Revoke selected keys", permissions=["change"])
    def revoke(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        keys = list(queryset.filter(revoked_at__isnull=True))
        for api_key in keys:
            api_key_revoke(api_key=api_key)
        messages.success(request, f"Revoked {len(keys)} key(s).")


@admin.register(TenantMembership)
class TenantMembershipAdmin(admin.ModelAdmin):
    list_display = ["user", "tenant", "role"]
    list_filter = ["role", "tenant"]
    search_fields = ["user__username", "tenant__slug"]
    autocomplete_fields = ["user"]
