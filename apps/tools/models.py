"""Which built-in tools a tenant may use, and a record of every tool run."""

from __future__ import annotations

from django.contrib.postgres.fields import ArrayField
from django.db import models
from django.utils import timezone

PYTHON, BASH, WEB_SEARCH = "python", "bash", "web_search"
TOOL_CHOICES = [(PYTHON, "python"), (BASH, "bash"), (WEB_SEARCH, "web_search")]
BUILT_IN_TOOLS = tuple(name for name, _ in TOOL_CHOICES)


class ToolAccess(models.Model):
    """The operator's allow-list for one tenant: no row, no built-in tools."""

    tenant = models.OneToOneField(
        "tenants.Tenant", on_delete=models.CASCADE, related_name="tool_access"
    )
    python = models.BooleanField(default=False, help_text="May run Python in the sandbox.")
    bash = models.BooleanField(default=False, help_text="May run shell commands in the sandbox.")
    web_search = models.BooleanField(
        default=False, help_text="May search the web (needs TOOLS_SEARXNG_URL)."
    )

    class Meta:
        verbose_name = "tool access"
        verbose_name_plural = "tool access"

    def __str__(self) -> str:
        return f"{self.tenant}: {', '.join(self.allowed()) or 'no tools'}"

    def allowed(self) -> list[str]:
        return [name for name in BUILT_IN_TOOLS if getattr(self, name)]


class ToolRun(models.Model):
    """One built-in tool call the gateway ran (or refused to run) for a tenant."""

    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="+")
    api_key = models.ForeignKey(
        "tenants.ApiKey", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    session_id = models.CharField(max_length=128, blank=True, help_text="X-Session-Id, if any.")
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    tool = models.CharField(max_length=16, choices=TOOL_CHOICES)
    backend = models.CharField(max_length=32, blank=True)
    command_excerpt = models.TextField(blank=True, help_text="The first characters of it.")
    exit_code = models.IntegerField(null=True, blank=True)
    duration_ms = models.FloatField(default=0)
    timed_out = models.BooleanField(default=False)
    limits_hit = ArrayField(models.CharField(max_length=16), default=list, blank=True)
    blocked_by_safety = models.BooleanField(default=False)
    blocked_reason = models.TextField(blank=True)
    error = models.TextField(blank=True, help_text="Why it could not run (sandbox unavailable).")

    class Meta:
        ordering = ["-created_at", "-pk"]
        indexes = [models.Index(fields=["tenant", "-created_at"], name="toolrun_tenant_created")]

    def __str__(self) -> str:
        return f"{self.tool} for {self.tenant_id} at {self.created_at:%Y-%m-%d %H:%M:%S}"
