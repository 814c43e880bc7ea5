from __future__ import annotations

from django.core.exceptions import ValidationError
from django.db import models


class CachePolicy(models.Model):
    """How long answers are cached for a tenant, a model, or one tenant's use of a model.

    The most specific policy applies: tenant and model, then tenant, then model, then
    RESPONSE_CACHE_SECONDS. 0 seconds turns the cache off for what the policy covers."""

    tenant = models.ForeignKey(
        "tenants.Tenant", null=True, blank=True, on_delete=models.CASCADE, related_name="+"
    )
    model = models.ForeignKey(
        "engines.ServedModel", null=True, blank=True, on_delete=models.CASCADE, related_name="+"
    )
    ttl_seconds = models.PositiveIntegerField(
        help_text="How long a cached answer is served (0: do not cache)."
    )

    class Meta:
        verbose_name_plural = "cache policies"
        constraints = [
            models.UniqueConstraint(
                fields=["tenant", "model"], name="unique_cache_policy", nulls_distinct=False
            ),
            models.CheckConstraint(
                condition=models.Q(tenant__isnull=False) | models.Q(model__isnull=False),
                name="cache_policy_scope",
            ),
        ]

    def __str__(self) -> str:
        tenant = self.tenant.slug if self.tenant_id else "every tenant"
        model = self.model.name if self.model_id else "every model"
        return f"{tenant} / {model}: {self.ttl_seconds} s"

    def clean(self) -> None:
        super().clean()
        if self.tenant_id is None and self.model_id is None:
            raise ValidationError(
                "Pick a tenant, a model, or both (RESPONSE_CACHE_SECONDS is the default)."
            )
