"""Pipeline stages between the model and the engine: sizing, variant choice, replica URL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from django.conf import settings

from apps.engines.engine_process import EngineStartError
from apps.engines.manager import engine_manager
from apps.engines.registry import ModelRoute, VariantRoute
from apps.engines.sizing import ContextTooLarge, choose_variant, completion_budget, prompt_tokens
from apps.proxy.errors import ApiError


async def size_and_choose(
    payload: dict[str, Any], *, route: ModelRoute, endpoint: str, exact: bool
) -> tuple[int, VariantRoute]:
    """(prompt tokens or 0 if not counted, the smallest variant whose context fits).

    Counting costs the engine two calls (/apply-template, /tokenize), so it runs only when
    the count is used: to choose among several variants, or (`exact`) to reserve a token
    quota for what the prompt really costs. With one variant the engine itself refuses an
    overflow (a heuristic guess here could refuse a request that fits). A managed engine
    that is not running is counted with the heuristic rather than started just to count.
    """
    variants = route.variants
    if len(variants) == 1 and not exact:
        return 0, variants[0]
    tokens, _method = await prompt_tokens(variants[0], payload, endpoint)
    if len(variants) == 1:
        return tokens, variants[0]
    needed = tokens + completion_budget(payload, settings.DEFAULT_MAX_TOKENS)
    try:
        return tokens, choose_variant(variants, needed, prompt_tokens=tokens, model=route.name)
    except ContextTooLarge as exc:
        param = "messages" if endpoint == "chat.completions" else "prompt"
        raise ApiError(400, str(exc), code=exc.code, param=param) from None


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
