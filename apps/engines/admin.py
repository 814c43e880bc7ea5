from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import Count, Prefetch, QuerySet
from django.http import HttpRequest, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.urls import path, reverse
from django.views.decorators.http import require_POST

from apps.core.admin import ReadOnlyAdminMixin
from apps.engines.models import Engine, EngineInstance, EngineVariant, ServedModel
from apps.engines.scheduler_service import scheduler_stats
from apps.engines.selectors import (
    CACHE_RECENT_WINDOW,
    CacheHitRate,
    engine_cache_hit_rates,
    engine_instance_statuses,
)
from apps.engines.services import engine_instance_request_action
from apps.tenants.models import Tenant

ACTIONS = (EngineInstance.Action.START, EngineInstance.Action.STOP, EngineInstance.Action.RESTART)
RECENT_LABEL = f"{int(CACHE_RECENT_WINDOW.total_seconds() // 3600)} h"


def percent(rate: float | None) -> str:
    return "-" if rate is None else f"{rate * 100:.1f} %"


def scheduling_rows(stats: dict[str, Any] | None) -> list[tuple[str, str]] | None:
    """The scheduler's view of an engine (slots, queue, waits), as label/value rows."""
    if stats is None:
        return None
    queued = ", ".join(f"{t}: {n}" for t, n in sorted(stats["queued_by_tenant"].items()))
    average = stats["avg_wait_seconds"]
    return [
        ("in flight / capacity", f"{stats['in_flight']} / {stats['capacity']}"),
        ("queued", f"{stats['queued']}" + (f" ({queued})" if queued else "")),
        ("granted (after waiting)", f"{stats['granted']} ({stats['granted_after_wait']})"),
        ("wait: average / longest", f"{average:.3f} s / {stats['max_wait_seconds']:.3f} s"),
        ("refused: queue full / waited too long",
         f"{stats['rejected_queue_full']} / {stats['rejected_wait_timeout']}"),
        ("sticky sessions: same slot / moved", f"{stats['sticky_hits']} / {stats['sticky_moves']}"),
    ]  # fmt: skip


def cache_hit_rows(rate: CacheHitRate) -> list[dict[str, str]]:
    """The change page's prompt-cache table: one row per window, numbers preformatted."""
    recent = (rate.recent, rate.recent_cached_tokens, rate.recent_prompt_tokens)
    total = (rate.total, rate.total_cached_tokens, rate.total_prompt_tokens)
    return [_cache_row(f"last {RECENT_LABEL}", *recent), _cache_row("all time", *total)]


def _cache_row(window: str, ratio: float | None, cached: int, prompt: int) -> dict[str, str]:
    return {
        "window": window,
        "rate": percent(ratio),
        "cached": f"{cached:,}",
        "prompt": f"{prompt:,}",
    }


class EngineForm(forms.ModelForm):
    class Meta:
        widgets = {
            "upstream_api_key": forms.PasswordInput(render_value=True),
            "command_template": forms.Textarea(attrs={"rows": 2, "cols": 100}),
        }


class EngineVariantForm(forms.ModelForm):
    class Meta:
        # A tabular row: a short box that grows when the operator writes a long prompt.
        widgets = {"system_prompt": forms.Textarea(attrs={"rows": 2, "cols": 40})}


class EngineVariantInline(admin.TabularInline):
    model = EngineVariant
    form = EngineVariantForm
    fields = ["model", "ctx_size", "model_path", "extra_args", "system_prompt"]
    autocomplete_fields = ["model"]
    extra = 0

    def get_queryset(self, request: HttpRequest) -> QuerySet[EngineVariant]:
        return super().get_queryset(request).select_related("engine", "model")


def _request_action(modeladmin: admin.ModelAdmin, request: HttpRequest, queryset, action: str):
    managed = [engine for engine in queryset if engine.is_managed]
    for engine in managed:
        engine_instance_request_action(engine=engine, action=action)
    skipped = len(queryset) - len(managed)
    if managed:
        names = ", ".join(engine.name for engine in managed)
        modeladmin.message_user(request, f"Asked to {action} {names}; the owning gateway "
                                "process carries it out within a second.")  # fmt: skip
    if skipped:
        modeladmin.message_user(
            request, f"{skipped} external engine(s) skipped: the gateway does not run them.",
            messages.WARNING,
        )  # fmt: skip


@admin.action(description="Start selected managed engines (all replicas)")
def start_engines(modeladmin, request, queryset) -> None:
    _request_action(modeladmin, request, queryset, EngineInstance.Action.START)


@admin.action(description="Stop selected managed engines (all replicas)")
def stop_engines(modeladmin, request, queryset) -> None:
    _request_action(modeladmin, request, queryset, EngineInstance.Action.STOP)


@admin.action(description="Restart selected managed engines (all replicas)")
def restart_engines(modeladmin, request, queryset) -> None:
    _request_action(modeladmin, request, queryset, EngineInstance.Action.RESTART)


@admin.register(Engine)
class EngineAdmin(admin.ModelAdmin):
    form = EngineForm
    list_display = [
        "name", "kind", "flavor", "where", "slots", "variant_count", "cache_hits", "instances",
    ]  # fmt: skip
    list_filter = ["kind", "flavor"]
    search_fields = ["name", "base_url"]
    readonly_fields = ["created_at"]
    inlines = [EngineVariantInline]
    actions = [start_engines, stop_engines, restart_engines]
    fieldsets = [
        (None, {"fields": ["name", "kind", "flavor", "slots", "timeout_seconds",
                           "upstream_api_key", "created_at"]}),
        ("External engine", {"fields": ["base_url", "extra_base_urls"]}),
        ("Managed engine (the gateway runs it)", {"fields": [
            "command_template", "replicas", "idle_ttl_seconds", "startup_timeout_seconds",
            "stop_grace_seconds",
        ]}),
    ]  # fmt: skip

    def get_queryset(self, request: HttpRequest) -> QuerySet[Engine]:
        instances = EngineInstance.objects.select_related("variant__model")
        return (
            super()
            .get_queryset(request)
            .annotate(num_variants=Count("variants"))
            .prefetch_related(Prefetch("instances", queryset=instances))
        )

    @admin.display(description="variants", ordering="num_variants")
    def variant_count(self, obj: Engine) -> int:
        return obj.num_variants

    @admin.display(description="base URL or command")
    def where(self, obj: Engine) -> str:
        return obj.command_template if obj.is_managed else ", ".join(obj.base_urls)

    @admin.display(description=f"prompt cache hits ({RECENT_LABEL} / all time)")
    def cache_hits(self, obj: Engine) -> str:
        rate = getattr(obj, "cache_hit_rate", None) or CacheHitRate()
        return f"{percent(rate.recent)} / {percent(rate.total)}"

    def get_changelist_instance(self, request: HttpRequest) -> Any:
        """The list page's engines, each with its cache hit rate (one query for the page)."""
        changelist = super().get_changelist_instance(request)
        # Evaluating result_list caches its objects: the rows rendered are these ones.
        engines = list(changelist.result_list)
        rates = engine_cache_hit_rates(engine_names=[engine.name for engine in engines])
        for engine in engines:
            engine.cache_hit_rate = rates.get(engine.name)
        return changelist

    @admin.display(description="instances")
    def instances(self, obj: Engine) -> str:
        if not obj.is_managed:
            return "-"
        rows = list(obj.instances.all())
        return " · ".join(s.summary for s in engine_instance_statuses(engine=obj, rows=rows))

    # --- the instances panel on the change page --------------------------------------

    def get_urls(self) -> list:
        view = self.admin_site.admin_view(require_POST(self.instance_action_view))
        return [
            path(
                "<path:object_id>/instances/<str:action>/",
                view,
                name="engines_engine_instance_action",
            ),
            *super().get_urls(),
        ]

    def instance_action_view(self, request: HttpRequest, object_id: str, action: str):
        engine = get_object_or_404(Engine, pk=object_id)
        if not self.has_change_permission(request, engine):
            raise PermissionDenied
        replica = request.POST.get("replica")
        if action not in ACTIONS or not engine.is_managed:
            self.message_user(request, f"Cannot {action} engine {engine.name}.", messages.ERROR)
        else:
            engine_instance_request_action(
                engine=engine, action=action, replica=int(replica) if replica else None
            )
            which = f"replica {replica}" if replica else "all replicas"
            self.message_user(request, f"Asked to {action} {engine.name} ({which}).")
        return HttpResponseRedirect(reverse("admin:engines_engine_change", args=[engine.pk]))

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ):
        engine = self.get_object(request, object_id)
        context = dict(extra_context or {})
        if engine is not None:
            rates = engine_cache_hit_rates(engine_names=[engine.name])
            context["cache_hits"] = cache_hit_rows(rates.get(engine.name) or CacheHitRate())
            context["scheduling"] = scheduling_rows(scheduler_stats(engine.name))
        if engine is not None and engine.is_managed:
            context["instance_statuses"] = engine_instance_statuses(engine=engine)
            context["instance_actions"] = ACTIONS
        return super().change_view(request, object_id, form_url, extra_context=context)


class ServedVariantInline(ReadOnlyAdminMixin, admin.TabularInline):
    """Which engines serve the model, at which context sizes (edit them on the engine)."""

    model = EngineVariant
    fields = ["engine", "ctx_size", "model_path", "system_prompt"]
    readonly_fields = fields
    extra = 0
    can_delete = False
    verbose_name_plural = "served by (edit on the engine's page)"

    def get_queryset(self, request: HttpRequest) -> QuerySet[EngineVariant]:
        return super().get_queryset(request).select_related("engine", "model")


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
        description="tenants allowing it (+ all not restricted)",
        ordering="num_tenants",
    )
    def tenant_count(self, obj: ServedModel) -> int:
        return obj.num_tenants

    @admin.display(description="tenants")
    def allowed_tenants(self, obj: ServedModel) -> str:
        if obj.pk is None:
            return "Tenants whose models are not restricted may use every model."
        listed = ", ".join(t.slug for t in obj.tenants.all()) or "none"
        unrestricted = Tenant.objects.filter(restrict_models=False).count()
        return (
            f"Listed in the allow-list of: {listed}. "
            f"Also usable by the {unrestricted} tenant(s) whose models are not restricted."
        )


from apps.engines import model_files_admin  # noqa: E402, F401  (registers ModelFile)
