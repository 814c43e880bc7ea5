from __future__ import annotations

from django.db import models
from django.utils import timezone


class RequestLog(models.Model):
    """One /v1 request: who, what, how it ended, tokens and timings."""

    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    tenant = models.ForeignKey(
        "tenants.Tenant", on_delete=models.CASCADE, related_name="request_logs"
    )
    api_key = models.ForeignKey(
        "tenants.ApiKey", null=True, on_delete=models.SET_NULL, related_name="request_logs"
    )
    endpoint = models.CharField(max_length=64)
    model = models.CharField(max_length=200, blank=True)
    engine = models.CharField(max_length=64, blank=True)
    stream = models.BooleanField(default=False)
    status_code = models.PositiveSmallIntegerField()
    error_code = models.CharField(max_length=64, blank=True)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    cached_tokens = models.PositiveIntegerField(
        default=0, help_text="Prompt tokens the engine took from its cache (llama.cpp cache_n)."
    )
    usage_estimated = models.BooleanField(
        default=False, help_text="The engine sent no usage (e.g. the client disconnected)."
    )
    client_disconnected = models.BooleanField(default=False)
    ttft_ms = models.FloatField(null=True, blank=True, help_text="Time to first token (ms).")
    latency_ms = models.FloatField(help_text="Total time in the gateway (ms).")
    safety_action = models.CharField(
        max_length=10,
        blank=True,
        default="",
        help_text="The strongest safety action on this request (block, redact, flag).",
    )
    cache_status = models.CharField(
        max_length=8,
        blank=True,
        default="",
        help_text="Response cache: hit, miss, bypass, or empty (not cacheable).",
    )
    cache_saved_tokens = models.PositiveIntegerField(
        default=0, help_text="Tokens a cache hit did not spend (what the cached answer cost)."
    )
    cost = models.DecimalField(
        max_digits=24,
        decimal_places=12,
        null=True,
        blank=True,
        help_text="What the request cost at its model's prices; empty: the model has none.",
    )

    class Meta:
        db_table = "proxy_requestlog"  # created by the proxy app, which owned it first
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["tenant", "-created_at"], name="proxy_reque_tenant__c2611f_idx"),
            # Prompt-cache hit rates per engine (engine admin) read only the index.
            models.Index(
                fields=["engine", "created_at"],
                include=["endpoint", "usage_estimated", "prompt_tokens", "cached_tokens"],
                name="requestlog_engine_cache",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.endpoint} {self.model} {self.status_code}"

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens
