from __future__ import annotations

from django.db import models
from django.utils import timezone


class Tenant(models.Model):
    slug = models.SlugField(max_length=64, unique=True)
    name = models.CharField(max_length=200, blank=True)
    active = models.BooleanField(default=True, help_text="Inactive tenants get 403 on /v1.")
    # An explicit flag, not "the list is empty": deleting the last model a restricted
    # tenant may use must leave it with no model, never with every model.
    restrict_models = models.BooleanField(
        default=False,
        help_text="Only the allowed models below may be used (none if the list is empty). "
        "Turned on when models are added to the list; off: every model.",
    )
    allowed_models = models.ManyToManyField(
        "engines.ServedModel",
        blank=True,
        related_name="tenants",
        help_text="The models this tenant may use when its models are restricted.",
    )
    system_prompt = models.TextField(
        blank=True, help_text="Default system prompt for this tenant's chats (least specific)."
    )
    requests_per_minute = models.PositiveIntegerField(
        null=True,
        blank=True,
        help_text="Requests per minute for the whole tenant; empty = no limit.",
    )
    scheduling_weight = models.PositiveIntegerField(
        default=1,
        help_text="Share of engine slots when tenants compete (2 = twice the share of 1).",
    )
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ["slug"]

    def __str__(self) -> str:
        return self.slug


class ApiKey(models.Model):
    """A tenant's key `sk-<prefix>_<secret>`; only the SHA-256 of the whole key is stored."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=16, unique=True, editable=False)
    key_hash = models.CharField(max_length=64, editable=False)
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True, editable=False)
    requests_per_minute = models.PositiveIntegerField(
        null=True, blank=True, help_text="Requests per minute for this key; empty = no limit."
    )

    class Meta:
        verbose_name = "API key"
        ordering = ["tenant__slug", "name"]
        constraints = [
            models.UniqueConstraint(fields=["tenant", "name"], name="unique_key_name_per_tenant"),
        ]

    def __str__(self) -> str:
        return f"{self.tenant.slug}/{self.name} (sk-{self.prefix}_…)"

    @property
    def is_revoked(self) -> bool:
        return self.revoked_at is not None

    def is_expired(self, *, now=None) -> bool:
        return self.expires_at is not None and self.expires_at <= (now or timezone.now())


class RotatedKey(models.Model):
    """A key's previous secret after rotation: it keeps authenticating as its ApiKey (same
    quotas, budgets, rate limits) until `grace_ends_at`, then gets 401 saying so."""

    api_key = models.ForeignKey(ApiKey, on_delete=models.CASCADE, related_name="rotated_keys")
    prefix = models.CharField(max_length=16, unique=True, editable=False)
    key_hash = models.CharField(max_length=64, editable=False)
    rotated_at = models.DateTimeField(default=timezone.now, editable=False)
    grace_ends_at = models.DateTimeField(editable=False)

    class Meta:
        verbose_name = "rotated API key"
        ordering = ["-rotated_at"]

    def __str__(self) -> str:
        return f"{self.api_key.tenant.slug}/{self.api_key.name} (old sk-{self.prefix}_…)"

    def in_grace(self, *, now=None) -> bool:
        return self.grace_ends_at > (now or timezone.now())


class TenantMembership(models.Model):
    """A person (Django user) of a tenant, for the tenant pages (e.g. document upload).
    Viewers read; editors also upload and delete."""

    class Role(models.TextChoices):
        VIEWER = "viewer"
        EDITOR = "editor"

    user = models.ForeignKey("auth.User", on_delete=models.CASCADE, related_name="memberships")
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.VIEWER)

    class Meta:
        ordering = ["tenant__slug", "user__username"]
        constraints = [
            models.UniqueConstraint(fields=["user", "tenant"], name="unique_membership"),
        ]

    def __str__(self) -> str:
        return f"{self.user} @ {self.tenant} ({self.role})"

    @property
    def can_edit(self) -> bool:
        return self.role == self.Role.EDITOR
