from __future__ import annotations

from urllib.parse import urlsplit

from django.contrib.postgres.fields import ArrayField
from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator
from django.db import models
from django.utils import timezone

from apps.engines.launch import (
    resolve_model_path,
    template_uses,
    validate_command_template,
    validate_extra_args,
)


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
        MANAGED = "managed", "managed (the gateway runs it)"

    class Flavor(models.TextChoices):
        LLAMACPP = "llamacpp", "llama.cpp llama-server"
        VLLM = "vllm", "vLLM"
        OPENAI = "openai", "other OpenAI-compatible"

    name = models.SlugField(max_length=64, unique=True)
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.EXTERNAL)
    flavor = models.CharField(max_length=16, choices=Flavor.choices, default=Flavor.LLAMACPP)
    base_url = models.CharField(
        max_length=500,
        blank=True,
        validators=[validate_engine_url],
        help_text="External engines: the engine's root, e.g. http://127.0.0.1:8080 "
        "(the gateway appends /v1/...).",
    )
    extra_base_urls = ArrayField(
        models.CharField(max_length=500, validators=[validate_engine_url]),
        default=list,
        blank=True,
        help_text="External engines: more roots serving the same models; each URL is one "
        "more replica (comma-separated).",
    )
    command_template = models.TextField(
        blank=True,
        help_text="Managed engines: the command that starts one replica, e.g. "
        "{llama_server} -m {model_path} --port {port} -c {ctx_total} -np {slots} {extra_args}. "
        "Placeholders: {port} (required), {model_path}, {ctx_size} (per request), {ctx_total} "
        "(ctx_size x slots: llama-server divides -c among its slots), {extra_args}, {slots}, "
        "{host}, {python}, {llama_server}.",
    )
    slots = models.PositiveIntegerField(
        default=1,
        validators=[MinValueValidator(1)],
        help_text="Requests one replica serves at once (llama-server's -np).",
    )
    replicas = models.PositiveIntegerField(
        default=1,
        validators=[MinValueValidator(1)],
        help_text="Managed engines: how many processes to run.",
    )
    idle_ttl_seconds = models.PositiveIntegerField(
        null=True,
        blank=True,
        help_text="Managed engines: stop a replica after this long without requests "
        "(empty: never).",
    )
    startup_timeout_seconds = models.FloatField(
        default=120.0,
        validators=[MinValueValidator(0.1)],
        help_text="Managed engines: longest wait for a new process to answer /health.",
    )
    stop_grace_seconds = models.FloatField(
        default=10.0,
        validators=[MinValueValidator(0.0)],
        help_text="Managed engines: time between SIGTERM and SIGKILL when stopping.",
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
        self.extra_base_urls = [url.rstrip("/") for url in self.extra_base_urls]
        super().save(*args, **kwargs)

    def clean(self) -> None:
        super().clean()
        if self.kind == self.Kind.MANAGED:
            self._clean_managed()
        elif not self.base_url:
            raise ValidationError({"base_url": "An external engine needs its base URL."})

    def _clean_managed(self) -> None:
        if not self.command_template.strip():
            raise ValidationError({"command_template": "A managed engine needs a command."})
        try:
            validate_command_template(self.command_template)
        except ValidationError as exc:
            raise ValidationError({"command_template": exc.messages}) from None
        if self.base_url or self.extra_base_urls:
            raise ValidationError(
                {"base_url": "A managed engine gets its URL from the gateway; leave it empty."}
            )

    @property
    def is_managed(self) -> bool:
        return self.kind == self.Kind.MANAGED

    @property
    def replica_count(self) -> int:
        """Managed: `replicas` processes; external: one replica per base URL."""
        if self.is_managed:
            return self.replicas
        return 1 + len(self.extra_base_urls)

    @property
    def base_urls(self) -> list[str]:
        """External engines' replica roots, replica 0 first (managed ones have none)."""
        return [self.base_url, *self.extra_base_urls] if self.base_url else []


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
    model_path = models.CharField(
        max_length=500,
        blank=True,
        help_text="Managed engines: the .gguf file, relative to the models directory (MODELS_DIR).",
    )
    extra_args = models.CharField(
        max_length=1000,
        blank=True,
        validators=[validate_extra_args],
        help_text="Managed engines: more arguments for this variant, put where the command "
        "has {extra_args}.",
    )

    class Meta:
        ordering = ["model__name", "ctx_size", "model_path"]
        constraints = [
            models.UniqueConstraint(
                fields=["engine", "model", "ctx_size", "model_path"],
                name="unique_variant",
                nulls_distinct=False,
            ),
        ]

    def __str__(self) -> str:
        ctx = f" ctx={self.ctx_size}" if self.ctx_size else ""
        path = f" {self.model_path}" if self.model_path else ""
        return f"{self.model.name} on {self.engine.name}{ctx}{path}"

    def clean(self) -> None:
        super().clean()
        if self.model_path:
            try:
                resolve_model_path(self.model_path)
            except ValidationError as exc:
                raise ValidationError({"model_path": exc.messages}) from None
        engine = self.engine if self.engine_id else None
        if engine is not None and engine.is_managed:
            self._clean_for_template(engine.command_template)

    def _clean_for_template(self, template: str) -> None:
        """What the engine's command uses, the variant must have (checked again at launch)."""
        try:
            needs_model = template_uses(template, "model_path")
            needs_ctx = next(
                (name for name in ("ctx_size", "ctx_total") if template_uses(template, name)), ""
            )
        except ValidationError:
            return  # the engine's own form reports a broken template
        if needs_model and not self.model_path:
            raise ValidationError({"model_path": "The engine's command uses {model_path}."})
        if needs_ctx and not self.ctx_size:
            raise ValidationError({"ctx_size": f"The engine's command uses {{{needs_ctx}}}."})

    @property
    def label(self) -> str:
        """Short name for status displays: model, context size, file."""
        ctx = f" ctx={self.ctx_size}" if self.ctx_size else ""
        path = f" ({self.model_path})" if self.model_path else ""
        return f"{self.model.name}{ctx}{path}"


class EngineInstance(models.Model):
    """One replica of a managed engine, as published by the gateway process that owns it.

    The owner (the process holding the replica's PostgreSQL advisory lock) launches the
    engine process and keeps this row current; other processes route by it and ask the
    owner for another variant (`requested_variant`) or an operator action
    (`requested_action`) by writing here.
    """

    class State(models.TextChoices):
        STOPPED = "stopped", "stopped"
        STARTING = "starting", "starting"
        RUNNING = "running", "running"
        DRAINING = "draining", "draining (swap or stop pending)"
        FAILED = "failed", "failed"

    class Action(models.TextChoices):
        NONE = "", "none"
        START = "start", "start"
        STOP = "stop", "stop"
        RESTART = "restart", "restart"

    engine = models.ForeignKey(Engine, on_delete=models.CASCADE, related_name="instances")
    replica = models.PositiveIntegerField(default=0)
    state = models.CharField(max_length=16, choices=State.choices, default=State.STOPPED)
    variant = models.ForeignKey(
        EngineVariant, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    requested_variant = models.ForeignKey(
        EngineVariant, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    requested_action = models.CharField(
        max_length=16, choices=Action.choices, blank=True, default=Action.NONE
    )
    requested_at = models.DateTimeField(null=True, blank=True)
    # Bumped at every launch: a lease taken by another process counts against the
    # generation it was admitted to, so a stale release never touches a newer process.
    generation = models.PositiveIntegerField(default=0)
    pid = models.PositiveIntegerField(null=True, blank=True)
    port = models.PositiveIntegerField(null=True, blank=True)
    base_url = models.CharField(max_length=500, blank=True)
    command = models.JSONField(default=list, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    swap_since = models.DateTimeField(null=True, blank=True)
    in_flight = models.PositiveIntegerField(default=0, help_text="In the owner process.")
    remote_in_flight = models.PositiveIntegerField(
        default=0, help_text="Admitted through this row by other gateway processes."
    )
    queued = models.PositiveIntegerField(default=0)
    last_used_at = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    log_tail = models.TextField(blank=True)
    owner_pid = models.PositiveIntegerField(null=True, blank=True)
    owner_host = models.CharField(max_length=255, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    state_changed_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["engine__name", "replica"]
        constraints = [
            models.UniqueConstraint(fields=["engine", "replica"], name="unique_engine_replica"),
        ]

    def __str__(self) -> str:
        return f"{self.engine.name}#{self.replica}"


class ModelFile(models.Model):
    """What `scan_models` found in one .gguf file: its metadata, the KV-cache size per
    token and the largest context that fits a memory budget, and (with --test-context)
    the largest context a real llama-server started with."""

    path = models.CharField(
        max_length=1000, unique=True, help_text="Relative to MODELS_DIR when inside it."
    )
    size_bytes = models.BigIntegerField()
    modified_at = models.DateTimeField(help_text="The file's mtime when it was scanned.")
    scanned_at = models.DateTimeField(default=timezone.now)
    error = models.TextField(blank=True, help_text="Why the file could not be read.")
    architecture = models.CharField(max_length=100, blank=True)
    name = models.CharField(max_length=300, blank=True)
    parameters = models.BigIntegerField(null=True, blank=True)
    context_length = models.PositiveIntegerField(
        null=True, blank=True, help_text="Trained context length."
    )
    block_count = models.PositiveIntegerField(null=True, blank=True, help_text="Layers.")
    head_count = models.PositiveIntegerField(null=True, blank=True)
    head_count_kv = models.PositiveIntegerField(null=True, blank=True, help_text="KV heads.")
    head_size = models.PositiveIntegerField(null=True, blank=True, help_text="Key length.")
    value_length = models.PositiveIntegerField(null=True, blank=True)
    quantization = models.CharField(max_length=40, blank=True)
    kv_bytes_per_token = models.BigIntegerField(null=True, blank=True, help_text="f16 cache.")
    kv_bytes_per_token_q8_0 = models.BigIntegerField(null=True, blank=True)
    memory_budget_bytes = models.BigIntegerField(null=True, blank=True)
    max_context_f16 = models.PositiveIntegerField(
        null=True, blank=True, help_text="Largest context fitting the budget, f16 KV cache."
    )
    max_context_q8_0 = models.PositiveIntegerField(
        null=True, blank=True, help_text="The same with --cache-type-k/v q8_0."
    )
    tested_context = models.PositiveIntegerField(
        null=True, blank=True, help_text="Largest -c a real llama-server started with."
    )
    failed_context = models.PositiveIntegerField(
        null=True, blank=True, help_text="Smallest -c it failed with (testing stops there)."
    )
    context_tests = models.JSONField(
        default=list, blank=True, help_text="Each launch: ctx, ok, seconds, detail."
    )

    class Meta:
        ordering = ["path"]

    def __str__(self) -> str:
        return self.path

    @property
    def context_test_done(self) -> bool:
        return self.failed_context is not None or (
            self.tested_context is not None and self.tested_context >= (self.context_length or 0)
        )
