"""Admin for ModelFile: what scan_models found in each .gguf (read-only)."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from apps.engines.models import ModelFile

MIB = 1024 * 1024


@admin.register(ModelFile)
class ModelFileAdmin(admin.ModelAdmin):
    list_display = [
        "path",
        "architecture",
        "parameters_m",
        "quantization",
        "context_length",
        "kv_bytes_per_token",
        "max_context_f16",
        "max_context_q8_0",
        "context_test",
        "scanned_at",
    ]
    list_filter = ["architecture", "quantization"]
    search_fields = ["path", "name", "architecture"]
    readonly_fields = ["budget_mib", "context_test"]

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        return [f.name for f in ModelFile._meta.fields] + self.readonly_fields

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # rows come from scan_models

    @admin.display(description="parameters (M)", ordering="parameters")
    def parameters_m(self, obj: ModelFile) -> str:
        return "-" if obj.parameters is None else f"{obj.parameters / 1e6:.0f}"

    @admin.display(description="memory budget (MiB)")
    def budget_mib(self, obj: ModelFile) -> str:
        return "-" if obj.memory_budget_bytes is None else f"{obj.memory_budget_bytes / MIB:.0f}"

    @admin.display(description="tested with llama-server")
    def context_test(self, obj: ModelFile) -> str:
        if obj.error:
            return f"unreadable: {obj.error}"
        if not obj.context_tests:
            return "not tested"
        started = f"started at {obj.tested_context}" if obj.tested_context else "never started"
        if obj.failed_context:
            return f"{started}, failed at {obj.failed_context}"
        return started + ("" if obj.context_test_done else " (unfinished; run again)")
