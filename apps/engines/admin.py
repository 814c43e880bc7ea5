from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin
from django.db.models import Count, QuerySet
from django.http import HttpRequest

from apps.engines.models import Engine, EngineVariant, ServedModel
from apps.tenants.models import Tenant


class EngineForm(forms.ModelForm):
    class Meta:
        widgets = {"upstream_api_key": forms.PasswordInput(render_value=True)}


class EngineVariantInline(admin.TabularInline):
    model = EngineVariant
    fields = ["model", "ctx_size"]
    autocomplete_fields = ["model"]
    extra = 0

    def get_queryset(self, request: HttpRequest) -> QuerySet[EngineVariant]:
        return super().get_queryset(request).select_related("engine", "model")


@admin.register(Engine)
class EngineAdmin(admin.ModelAdmin):
    form = EngineForm
    list_display = ["name", "kind", "flavor", "base_url", "variant_count"]
    list_filter = ["kind", "flavor"]
    search_fields = ["name", "base_url"]
    readonly_fields = ["created_at"]
    inlines = [EngineVariantInline]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Engine]:
        return super().get_queryset(request).annotate(num_variants=Count("variants"))

    @admin.display(description="variants", ordering="num_variants")
    def variant_count(self, obj: Engine) -> int:
        return obj.num_variants


class ServedVariantInline(admin.TabularInline):
    """Which engines serve the model, at which context sizes (edit them on the engine)."""

    model = EngineVariant
    fields = ["engine", "ctx_size"]
    readonly_fields = fields
    extra = 0
    can_delete = False
    verbose_name_plural = "served by (edit on the engine's page)"

    def get_queryset(self, request: HttpRequest) -> QuerySet[EngineVariant]:
        return super().get_queryset(request).select_related("engine", "model")

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(ServedModel)
class ServedModelAdmin(admin.ModelAdmin):
    list_display = ["name", "variant_count", "tenant_count", "created_at"]
    search_fields = ["name"]
    fields = ["name", "created_at", "allowed_tenants"]
    readonly_fields = ["created_at", "allowed_tenants"]
    inlines = [ServedVariantInline]

    def get_queryset(self, request: HttpRequest) -> QuerySet[ServedModel]:
        return (
            super()
            .get_queryset(request)
            .annotate(
                num_variants=Count("variants", distinct=True),
                num_tenants=Count("tenants", distinct=True),
            )
        )

    @admin.display(description="variants", ordering="num_variants")
    def variant_count(self, obj: ServedModel) -> int:
        return obj.num_variants

    @admin.display(
        description="tenants allowing it (+ all with an empty allow-list)",
        ordering="num_tenants",
    )
    def tenant_count(self, obj: ServedModel) -> int:
        return obj.num_tenants

    @admin.display(description="tenants")
    def allowed_tenants(self, obj: ServedModel) -> str:
        if obj.pk is None:
            return "Tenants with an empty allow-list may use every model."
        listed = ", ".join(t.slug for t in obj.tenants.all()) or "none"
        unrestricted = Tenant.objects.filter(allowed_models=None).count()
        return (
            f"Listed in the allow-list of: {listed}. "
            f"Also usable by the {unrestricted} tenant(s) whose allow-list is empty "
            "(an empty allow-list means every model)."
        )
