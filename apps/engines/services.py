"""Writes for engines, served models, their variants, and operator requests on instances."""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from apps.engines.models import (
    Engine,
    EngineInstance,
    EngineVariant,
    ServedModel,
    validate_fallbacks,
)


@transaction.atomic
def engine_register_external(
    *,
    name: str,
    base_url: str,
    models: list[str],
    ctx_size: int | None = None,
    flavor: str | None = None,
    extra_base_urls: list[str] | None = None,
    slots: int | None = None,
    system_prompt: str | None = None,
) -> Engine:
    """Create or update an external engine and add a variant for each model name.

    Running it again for the same engine adds models; an existing base URL is replaced;
    the flavor, extra URLs and slots are kept unless given (a new engine defaults to
    llama.cpp, one URL, one slot). `system_prompt`, if given, is set on each variant this
    run creates or finds; otherwise a variant keeps its own.
    """
    engine = Engine.objects.filter(name=name).first() or Engine(name=name)
    engine.kind = Engine.Kind.EXTERNAL
    engine.base_url = base_url
    engine.command_template = ""
    if extra_base_urls is not None:
        engine.extra_base_urls = extra_base_urls
    _set_if_given(engine, flavor=flavor, slots=slots)
    engine.full_clean()
    engine.save()
    for model_name in models:
        served, _ = ServedModel.objects.get_or_create(name=model_name)
        variant, _ = EngineVariant.objects.get_or_create(
            engine=engine, model=served, ctx_size=ctx_size
        )
        _set_system_prompt(variant, system_prompt)
    return engine


@transaction.atomic
def engine_register_managed(
    *,
    name: str,
    command_template: str,
    models: list[str],
    ctx_size: int | None = None,
    model_path: str = "",
    extra_args: str = "",
    flavor: str | None = None,
    slots: int | None = None,
    replicas: int | None = None,
    idle_ttl_seconds: int | None = None,
    startup_timeout_seconds: float | None = None,
    stop_grace_seconds: float | None = None,
    system_prompt: str | None = None,
) -> Engine:
    """Create or update a managed engine (the gateway runs `command_template`) and add a
    variant per model name with this context size, model file and extra arguments.

    Run it once per variant: the same model with another context size or model path adds
    a variant; the same one again updates its extra arguments. Settings not given keep
    their current value (or the default for a new engine); so does a variant's system
    prompt when `system_prompt` is None. Everything is validated
    (placeholders, model path inside MODELS_DIR) before anything is written.
    """
    engine = Engine.objects.filter(name=name).first() or Engine(name=name)
    engine.kind = Engine.Kind.MANAGED
    engine.command_template = command_template
    engine.base_url, engine.extra_base_urls = "", []
    _set_if_given(
        engine,
        flavor=flavor,
        slots=slots,
        replicas=replicas,
        idle_ttl_seconds=idle_ttl_seconds,
        startup_timeout_seconds=startup_timeout_seconds,
        stop_grace_seconds=stop_grace_seconds,
    )
    engine.full_clean()
    engine.save()
    for model_name in models:
        served, _ = ServedModel.objects.get_or_create(name=model_name)
        variant = EngineVariant.objects.filter(
            engine=engine, model=served, ctx_size=ctx_size, model_path=model_path
        ).first() or EngineVariant(
            engine=engine, model=served, ctx_size=ctx_size, model_path=model_path
        )
        variant.extra_args = extra_args
        if system_prompt is not None:
            variant.system_prompt = system_prompt
        variant.full_clean(validate_constraints=False)  # get-or-update: never a duplicate
        variant.save()
    return engine


def _set_system_prompt(variant: EngineVariant, system_prompt: str | None) -> None:
    """None keeps the variant's prompt (re-running the command must not erase it)."""
    if system_prompt is not None and variant.system_prompt != system_prompt:
        variant.system_prompt = system_prompt
        variant.save(update_fields=["system_prompt"])


def _set_if_given(engine: Engine, **values: object) -> None:
    for field, value in values.items():
        if value is not None:
            setattr(engine, field, value)


def engine_instances_ensure(*, engine: Engine) -> list[EngineInstance]:
    """One row per replica of a managed engine, so every replica can be shown and acted on."""
    rows = [
        EngineInstance.objects.get_or_create(engine=engine, replica=replica)[0]
        for replica in range(engine.replicas)
    ]
    return rows


def engine_instance_request_action(
    *, engine: Engine, action: str, replica: int | None = None
) -> int:
    """Ask the owning gateway process to start, stop or restart the engine's replicas
    (all of them, or one). The owner (or, for a replica nobody owns, any gateway
    process) carries it out within ENGINE_OWNER_POLL_SECONDS. Returns the rows asked."""
    if not engine.is_managed:
        raise ValueError(f"Engine {engine.name} is not managed by the gateway.")
    if action not in EngineInstance.Action.values or not action:
        raise ValueError(f"Unknown action {action!r}.")
    engine_instances_ensure(engine=engine)
    rows = EngineInstance.objects.filter(engine=engine, replica__lt=engine.replicas)
    if replica is not None:
        rows = rows.filter(replica=replica)
    return rows.update(requested_action=action, requested_at=timezone.now())


def served_model_set_fallbacks(*, name: str, fallbacks: list[str]) -> ServedModel:
    """Replace a model's fallbacks (in order; empty clears them). ValidationError if the
    model or a fallback does not exist, or the list names the model itself."""
    try:
        model = ServedModel.objects.get(name=name)
    except ServedModel.DoesNotExist:
        raise ValidationError(f"No such model: {name}.") from None
    validate_fallbacks(name, fallbacks)
    model.fallbacks = fallbacks
    model.save(update_fields=["fallbacks"])
    return model
