from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.core.exceptions import ValidationError
from django.db.models import Count, Q, QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.utils import timezone
from django.utils.html import format_html_join
from django.utils.safestring import mark_safe

from apps.core.admin import ReadOnlyAdminMixin
from apps.tenants.durations import parse_grace
from apps.tenants.models import ApiKey, RotatedKey, Tenant, TenantMembership
from apps.tenants.services import (
    RotationError,
    api_key_fill_new,
    api_key_revoke,
    api_key_rotate,
)

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


def rotated_key_state(old: RotatedKey) -> str:
    if old.in_grace():
        return f"in grace until {old.grace_ends_at:%Y-%m-%d %H:%M:%S} UTC"
    return "rotated out"


def old_key(obj: RotatedKey) -> str:
    return f"sk-{obj.prefix}_…"


@admin.register(RotatedKey)
class RotatedKeyAdmin(admin.ModelAdmin):
    list_display = ["api_key", "old_key", "rotated_at", "grace_ends_at", "state"]
    list_select_related = ["api_key__tenant"]
    list_filter = ["api_key__tenant"]
    search_fields = ["prefix", "api_key__name", "api_key__tenant__slug"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description="old key")
    def old_key(self, obj: RotatedKey) -> str:
        return old_key(obj)

    @admin.display(description="state")
    def state(self, obj: RotatedKey) -> str:
        return rotated_key_state(obj)


class RotateForm(forms.Form):
    grace = forms.CharField(
        initial="24h", help_text="How long the old keys keep working: 0, 90s, 30m, 24h, 7d."
    )

    def clean_grace(self) -> Any:
        try:
            return parse_grace(self.cleaned_data["grace"])
        except ValueError as e:
            raise ValidationError(str(e)) from e


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
    actions = ["revoke", "rotate"]

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
        "previous_keys",
    ]
    change_readonly_fields = [
        "previous_keys",
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

    @admin.display(description="previous keys (rotated)")
    def previous_keys(self, obj: ApiKey) -> str:
        # A read-only list, not an inline: an inline would add a formset to every save.
        rows = [(old_key(old), rotated_key_state(old)) for old in obj.rotated_keys.all()]
        if not rows:
            return "none"
        return format_html_join(mark_safe("<br>"), "{}: {}", rows)

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

    @admin.action(
        description="Rotate selected keys (new key, old one kept for a grace period)",
        permissions=["change"],
    )
    def rotate(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> HttpResponse | None:
        form = RotateForm(request.POST if "grace" in request.POST else None)
        if not form.is_valid():
            context = {
                **self.admin_site.each_context(request),
                "title": "Rotate API keys",
                "form": form,
                "keys": queryset,
                "opts": self.model._meta,
                "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
            }
            return TemplateResponse(request, "admin/tenants/apikey/rotate.html", context)
        for api_key in queryset.select_related("tenant"):
            try:
                rotated = api_key_rotate(api_key=api_key, grace=form.cleaned_data["grace"])
            except RotationError as e:
                messages.error(request, f"{api_key}: {e}")
                continue
            messages.success(
                request,
                f"{api_key.tenant.slug}/{api_key.name}: "
                + ONE_TIME_KEY_MESSAGE.format(raw_key=rotated.raw_key),
            )
        return None


@admin.register(TenantMembership)
class TenantMembershipAdmin(admin.ModelAdmin):
    list_display = ["user", "tenant", "role"]
    list_filter = ["role", "tenant"]
    search_fields = ["user__username", "tenant__slug"]
    autocomplete_fields = ["user"]
