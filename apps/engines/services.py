"""Writes for engines, served models and their variants."""

from __future__ import annotations

from django.db import transaction

from apps.engines.models import Engine, EngineVariant, ServedModel


@transaction.atomic
def engine_register_external(
    *,
    name: str,
    base_url: str,
    models: list[str],
    ctx_size: int | None = None,
    flavor: str | None = None,
) -> Engine:
    """Create or update an external engine and add a variant for each model name.

    Running it again for the same engine adds models; an existing base URL is replaced;
    the flavor is kept unless one is given (a new engine defaults to llama.cpp).
    """
    engine = Engine.objects.filter(name=name).first() or Engine(name=name)
    engine.base_url = base_url
    engine.kind = Engine.Kind.EXTERNAL
    if flavor is not None:
        engine.flavor = flavor
    engine.full_clean()
    engine.save()
    for model_name in models:
        served, _ = ServedModel.objects.get_or_create(name=model_name)
        EngineVariant.objects.get_or_create(engine=engine, model=served, ctx_size=ctx_size)
    return engine
