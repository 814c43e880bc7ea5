from __future__ import annotations

from urllib.parse import urlsplit

from django.contrib.postgres.fields import ArrayField
from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator
from django.db import models
from django.utils import timezone


def validate_engine_url(value: str) -> None:
    """http(s) with a host; unlike URLField, dotless hosts (`http://llama:8080`) are fine."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValidationError(
            f"Enter an http(s) URL with a host, e.g. http://127.0.0.1:8080 ({value!r})."
        )


class Engine(models.Model):
    """An OpenAI-compatible inference server (llama-server, vLLM, ...)."""

    class Kind(models.TextChoices):
        EXTERNAL = "external", "external (runs elsewhere)"

    class Flavor(models.TextChoices):
        LLAMACPP = "llamacpp", "llama.cpp llama-server"
        VLLM = "vllm", "vLLM"
        OPENAI = "openai", "other OpenAI-compatible"

    name = models.SlugField(max_length=64, unique=True)
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.EXTERNAL)
    flavor = models.CharField(max_length=16, choices=Flavor.choices, default=Flavor.LLAMACPP)
    base_url = models.CharField(
        max_length=500,
        validators=[validate_engine_url],
        help_text="The engine's root, e.g. http://127.0.0.1:8080 (the gateway appends /v1/...).",
    )
    upstream_api_key = models.CharField(
        max_length=500, blank=True, help_text="Sent as the Bearer token to the engine, if set."
    )
    timeout_seconds = models.FloatField(
        default=600.0,
        validators=[MinValueValidator(0.1)],
        help_text="Longest wait for the engine's next bytes before the request fails with 504.",
    )
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def save(self, *args, **kwargs) -> None:
        self.base_url = self.base_url.rstrip("/")
        super().save(*args, **kwargs)


class ServedModel(models.Model):
    """A model name tenants ask for; served by one or more engine variants."""

    class Tier(models.TextChoices):
        NONE = "", "none"
        LIGHT = "light", "light"
        MEDIUM = "medium", "medium"
        HEAVY = "heavy", "heavy"

    name = models.CharField(max_length=200, unique=True)
    aliases = ArrayField(
        models.CharField(max_length=200),
        default=list,
        blank=True,
        help_text="Other names clients may use for this model (comma-separated).",
    )
    tier = models.CharField(
        max_length=16,
        choices=Tier.choices,
        blank=True,
        help_text="Clients may ask for the tier name (light/medium/heavy) instead; "
        "if several models share a tier, the first by name serves it.",
    )
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class EngineVariant(models.Model):
    """One way an engine serves a model (its context size and launch settings)."""

    engine = models.ForeignKey(Engine, on_delete=models.CASCADE, related_name="variants")
    model = models.ForeignKey(ServedModel, on_delete=models.CASCADE, related_name="variants")
    ctx_size = models.PositiveIntegerField(
        null=True, blank=True, help_text="Context size in tokens; empty when unknown."
    )
    system_prompt = models.TextField(
        blank=True,
        help_text="Default system prompt for this model variant (overrides the tenant's).",
    )

    class Meta:
        ordering = ["model__name", "ctx_size"]
        constraints = [
            models.UniqueConstraint(
                fields=["engine", "model", "ctx_size"],
                name="unique_variant",
                nulls_distinct=False,
            ),
        ]

    def __str__(self) -> str:
        ctx = f" ctx={self.ctx_size}" if self.ctx_size else ""
        return f"{self.model.name} on {self.engine.name}{ctx}"
