"""Pipeline stages between the model and the engine: sizing, variant choice, replica URL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from django.conf import settings

from apps.core.errors import ApiError
from apps.engines.engine_process import EngineStartError
from apps.engines.manager import engine_manager
from apps.engines.registry import ModelRoute, VariantRoute
from apps.engines.sizing import (
    TOKENIZE,
    ContextTooLarge,
    choose_variant,
    completion_budget,
    fitting_variants,
    prompt_token_bound,
    prompt_tokens,
)


async def size_and_choose(
    payload: dict[str, Any], *, route: ModelRoute, endpoint: str
) -> tuple[int, VariantRoute]:
    """(prompt tokens as the engine counted them, or 0, the smallest variant that fits).

    Counting costs the engine two calls (/apply-template, /tokenize), so it runs only when
    there is a choice to make that an upper bound of the prompt cannot settle. With one
    variant the engine itself refuses an overflow (a heuristic guess here could refuse a
    request that fits). A managed engine that is not running is counted with the
    heuristic rather than started just to count.
    """
    variants = route.variants
    if len(variants) == 1:
        return 0, variants[0]
    budget = completion_budget(payload, settings.DEFAULT_MAX_TOKENS)
    smallest = _smallest_by_bound(variants, payload, endpoint, budget)
    if smallest is not None:
        return 0, smallest
    tokens, method = await prompt_tokens(variants[0], payload, endpoint, model=route.name)
    needed = tokens + budget
    counted = tokens if method == TOKENIZE else 0
    try:
        return counted, choose_variant(variants, needed, prompt_tokens=tokens, model=route.name)
    except ContextTooLarge as exc:
        param = "messages" if endpoint == "chat.completions" else "prompt"
        raise ApiError(400, str(exc), code=exc.code, param=param) from None


def _smallest_by_bound(
    variants: tuple[VariantRoute, ...], payload: dict[str, Any], endpoint: str, budget: int
) -> VariantRoute | None:
    """The smallest variant, if an upper bound of the prompt already fits it: counting
    could not choose anything else, so the two calls to the engine are saved (most chat
    turns are far smaller than the smallest context)."""
    bound = prompt_token_bound(payload, endpoint)
    if bound is None:
        return None
    fitting = fitting_variants(variants, bound + budget)
    smallest = fitting_variants(variants, 0)
    return fitting[0] if fitting and smallest and fitting[0] is smallest[0] else None


async def replica_order(variant: VariantRoute) -> tuple[int, ...]:
    """For a managed engine with several replicas: those already running this variant
    first, then idle ones, so a request does not swap a replica another could serve."""
    engine = variant.engine
    if not engine.managed or engine.replicas < 2:
        return ()
    return await engine_manager.replica_order(
        engine_id=engine.id, variant_id=variant.id, replicas=engine.replicas
    )


@asynccontextmanager
async def replica_url(variant: VariantRoute, replica: int) -> AsyncIterator[str]:
    """Where to send the request: an external replica's root, or a managed replica that
    runs this variant (started or swapped to it first), held in use while the block runs."""
    engine = variant.engine
    if not engine.managed:
        yield engine.base_urls[replica] if engine.base_urls else engine.base_url
        return
    try:
        lease = engine_manager.acquire(engine_id=engine.id, variant_id=variant.id, replica=replica)
        async with lease:
            yield lease.base_url
    except EngineStartError as exc:
        raise ApiError(
            503,
            f"Engine `{engine.name}` could not start: {exc}",
            type="api_error",
            code="engine_unavailable",
            headers=[(b"retry-after", b"5")],
        ) from None
