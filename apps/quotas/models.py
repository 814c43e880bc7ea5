"""Token quotas, their per-period windows, and open reservations against them.

A request reserves tokens in the current window of every quota that applies to it, then
settles (actual usage replaces the reservation). For each window, `reserved_tokens` is the
sum of the open reservations that hold it, so `used + reserved <= limit` is what every
reservation checks under a row lock.
"""

from __future__ import annotations

import uuid
from decimal import Decimal

from django.contrib.postgres.fields import ArrayField
from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator
from django.db import models
from django.utils import timezone

from apps.quotas.periods import Period
from apps.tenants.models import Tenant


class Unit(models.TextChoices):
    TOKENS = "tokens", "tokens"
    # A cost budget: money, counted in COST_SCALE (10^-12) currency units so prices with
    # 6 decimals per million tokens cost a whole number per token (apps/quotas/costs.py).
    COST = "cost", "cost"


class Quota(models.Model):
    """At most `limit_tokens` prompt + completion tokens per period, for a whole tenant
    (api_key empty) or for one of its keys; with unit=cost, a money budget whose limit,
    windows and reservations count pico-units instead of tokens (same machinery)."""

    tenant = models.ForeignKey(
        "tenants.Tenant", on_delete=models.CASCADE, related_name="token_quotas"
    )
    api_key = models.ForeignKey(
        "tenants.ApiKey",
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="token_quotas",
        help_text="Empty: the quota covers every key of the tenant together.",
    )
    period = models.CharField(max_length=8, choices=Period.choices)
    limit_tokens = models.PositiveBigIntegerField(
        help_text="Prompt + completion tokens (cost budgets: 10^-12 currency units)."
    )
    unit = models.CharField(max_length=8, choices=Unit.choices, default=Unit.TOKENS)
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ["tenant__slug", "api_key__name", "period"]
        constraints = [
            # nulls_distinct=False: at most one tenant-wide quota per period too.
            models.UniqueConstraint(
                fields=["tenant", "api_key", "period", "unit"],
                name="unique_quota_per_scope_period_unit",
                nulls_distinct=False,
                violation_error_message="This tenant or key already has a quota for this period.",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.tenant.slug} {self.scope} {self.period}: {self.limit_tokens:,} tokens"

    def validate_constraints(self, exclude: object = None) -> None:
        # Forms never show `unit` (each admin sets its own), so Django would skip the
        # (tenant, key, period, unit) constraint and the insert would fail instead.
        if exclude:
            exclude = set(exclude) - {"unit"}
        super().validate_constraints(exclude=exclude)

    @property
    def scope(self) -> str:
        return scope_label(self.api_key.name if self.api_key_id else None)

    def clean(self) -> None:
        if self.api_key_id and self.tenant_id and self.api_key.tenant_id != self.tenant_id:
            raise ValidationError({"api_key": "This API key belongs to another tenant."})


def scope_label(key_name: str | None) -> str:
    return "tenant" if key_name is None else f"key {key_name}"


class QuotaWindow(models.Model):
    """One period of one quota: what was used and what is reserved by requests in flight."""

    quota = models.ForeignKey(Quota, on_delete=models.CASCADE, related_name="windows")
    window_start = models.DateTimeField(help_text="UTC start of the hour/day/month.")
    used_tokens = models.BigIntegerField(default=0)
    reserved_tokens = models.BigIntegerField(default=0)

    class Meta:
        ordering = ["quota_id", "-window_start"]
        constraints = [
            models.UniqueConstraint(
                fields=["quota", "window_start"], name="unique_window_per_quota"
            ),
            # Reservations and settlements keep these exact; a negative value means a bug,
            # and failing loudly beats silently granting extra tokens.
            models.CheckConstraint(
                condition=models.Q(used_tokens__gte=0, reserved_tokens__gte=0),
                name="quota_window_non_negative",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.quota_id} @ {self.window_start:%Y-%m-%d %H:%M}"


class Reservation(models.Model):
    """Tokens held in some windows by a request in flight; deleted when settled.

    window_ids is a plain array (no FK): a window deleted with its quota simply no longer
    receives the settlement.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey(
        "tenants.Tenant", on_delete=models.CASCADE, related_name="quota_reservations"
    )
    # SET_NULL, not CASCADE: deleting a key must not drop a reservation that also holds
    # tokens in tenant-wide windows; the sweep releases it.
    api_key = models.ForeignKey(
        "tenants.ApiKey",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="quota_reservations",
    )
    tokens = models.BigIntegerField()
    window_ids = ArrayField(models.BigIntegerField())
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    released_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="Set when the sweep gave the tokens back (the request outlived the TTL); "
        "a late settlement then only charges the usage.",
    )

    class Meta:
        ordering = ["created_at"]

    def __str__(self) -> str:
        return f"{self.tokens:,} tokens ({self.id})"


class Usage(Tenant):
    """Tenants seen from the quotas app: gives the admin index a "Usage" entry whose rows
    link to each tenant's usage page. No table of its own."""

    class Meta:
        proxy = True
        verbose_name = "usage by tenant"
        verbose_name_plural = "usage by tenant"


class BudgetManager(models.Manager):
    def get_queryset(self) -> models.QuerySet:
        return super().get_queryset().filter(unit=Unit.COST)


class Budget(Quota):
    """Cost budgets (Quota rows with unit=cost), for their own admin page."""

    objects = BudgetManager()

    class Meta:
        proxy = True
        verbose_name = "cost budget"

    def __str__(self) -> str:
        return f"{self.tenant.slug} {self.scope} {self.period}: budget"


class ModelPrice(models.Model):
    """What a served model costs, in currency units per million tokens."""

    model = models.OneToOneField(
        "engines.ServedModel", on_delete=models.CASCADE, related_name="price"
    )
    input_per_million = models.DecimalField(
        max_digits=14, decimal_places=6, validators=[MinValueValidator(Decimal(0))]
    )
    output_per_million = models.DecimalField(
        max_digits=14, decimal_places=6, validators=[MinValueValidator(Decimal(0))]
    )
    cached_input_per_million = models.DecimalField(
        max_digits=14,
        decimal_places=6,
        null=True,
        blank=True,
        validators=[MinValueValidator(Decimal(0))],
        help_text="Prompt tokens served from the engine's cache; empty: the input price.",
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["model__name"]

    def __str__(self) -> str:
        return f"{self.model.name}: {self.input_per_million}/{self.output_per_million} per 1M"
