"""Pipeline stages of the engines app: resolve the model, size the prompt and choose the
variant, adapt the request to the engine, then (around the engine call) a scheduler slot on
a replica and that replica's URL."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from django.conf import settings

from apps.core.context import NO_HISTORY, RequestContext, SessionHistory
from apps.core.errors import ApiError, model_not_found
from apps.engines.breaker import breaker
from apps.engines.engine_process import EngineStartError
from apps.engines.manager import ReplicaLease, engine_manager
from apps.engines.registry import EngineRoute, ModelRoute, VariantRoute, registry
from apps.engines.scheduler import Placement, SchedulerBusy, SlotRequest
from apps.engines.scheduler_service import worker_scheduler
from apps.engines.sizing import (
    TOKENIZE,
    ContextTooLarge,
    choose_variant,
    completion_budget,
    fitting_variants,
    heuristic_prompt_tokens,
    prompt_token_bound,
    prompt_tokens,
)
from apps.engines.transforms import (
    ToolCallStreamParser,
    adapt_response_format,
    tool_calls_in_response,
    wants_tool_parsing,
)
from apps.tenants.auth import Principal

GENERATING_ENDPOINTS = frozenset({"chat.completions", "completions"})


def largest_variant(route: ModelRoute) -> VariantRoute:
    """The variant with the most context (unknown size counts as unbounded)."""
    return max(route.variants, key=lambda v: v.ctx_size if v.ctx_size else float("inf"))


async def allowed_route(principal: Principal, name: str) -> ModelRoute:
    """The model by name, alias or tier, if the tenant may use it (404 otherwise)."""
    route = (await registry.get()).find(name)
    if route is None or not route.variants or not principal.may_use(route.id):
        raise model_not_found(name)
    return route


async def resolve_model(ctx: RequestContext) -> None:
    assert ctx.principal is not None
    route = await allowed_route(ctx.principal, ctx.payload["model"])
    ctx.route, ctx.model = route, route.name
    ctx.variant = route.variants[0]  # until choose_variant_by_size sizes the prompt


async def choose_variant_by_size(ctx: RequestContext) -> None:
    """Generating endpoints: the smallest variant that holds the prompt plus the answer."""
    assert ctx.route is not None
    tokens, ctx.variant = await size_and_choose(
        ctx.payload, route=ctx.route, endpoint=ctx.endpoint, history=ctx.history
    )
    if tokens:
        ctx.prompt_estimate, ctx.prompt_counted = tokens, True


async def adapt_for_engine(ctx: RequestContext) -> None:
    """Engine-specific request changes once the variant is known, the model's own name (an
    alias or a tier means nothing to the engine), and the prompt's heuristic size."""
    assert ctx.variant is not None
    assert ctx.route is not None
    engine = ctx.variant.engine
    ctx.engine = engine.name
    if ctx.endpoint in GENERATING_ENDPOINTS and adapt_response_format(ctx.payload, engine.flavor):
        ctx.payload_changed = True
    if ctx.payload["model"] != ctx.route.name:
        ctx.payload["model"] = ctx.route.name
        ctx.payload_changed = True
    if not ctx.prompt_estimate:
        ctx.prompt_estimate = heuristic_prompt_tokens(ctx.payload, ctx.endpoint, ctx.history)


class ToolCallsFilter:
    """`<tool_call>` text a model writes, as OpenAI tool_calls (whole and streamed)."""

    def whole(self, ctx: RequestContext, body: Any) -> Any:
        if isinstance(body, dict):
            tool_calls_in_response(body)
        return body

    def stream(self, ctx: RequestContext) -> ToolCallStreamParser:
        return ToolCallStreamParser()


async def tool_call_parsing(ctx: RequestContext) -> None:
    if wants_tool_parsing(ctx.payload):
        ctx.response_filters.append(ToolCallsFilter())


async def size_and_choose(
    payload: dict[str, Any],
    *,
    route: ModelRoute,
    endpoint: str,
    history: SessionHistory = NO_HISTORY,
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
    smallest = _smallest_by_bound(variants, payload, endpoint, budget, history)
    if smallest is not None:
        return 0, smallest
    tokens, method = await prompt_tokens(
        variants[0], payload, endpoint, model=route.name, history=history
    )
    needed = tokens + budget
    counted = tokens if method == TOKENIZE else 0
    try:
        return counted, choose_variant(variants, needed, prompt_tokens=tokens, model=route.name)
    except ContextTooLarge as exc:
        param = "messages" if endpoint == "chat.completions" else "prompt"
        raise ApiError(400, str(exc), code=exc.code, param=param) from None


def _smallest_by_bound(
    variants: tuple[VariantRoute, ...],
    payload: dict[str, Any],
    endpoint: str,
    budget: int,
    history: SessionHistory,
) -> VariantRoute | None:
    """The smallest variant, if an upper bound of the prompt already fits it: counting
    could not choose anything else, so the two calls to the engine are saved (most chat
    turns are far smaller than the smallest context)."""
    bound = prompt_token_bound(payload, endpoint, history)
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


async def healthy_replica_order(variant: VariantRoute, avoid: frozenset[int]) -> tuple[int, ...]:
    """replica_order without replicas whose circuit is open or that just failed this
    request (a retry goes to another replica when there is one); 503 when every replica's
    circuit is open."""
    engine = variant.engine
    allowed = [r for r in range(engine.replicas) if breaker.allows(engine.name, r)]
    if not allowed:
        raise ApiError(
            503,
            f"Engine `{engine.name}` is failing (circuit open); retry later.",
            type="api_error",
            code="engine_unavailable",
            headers=[
                (b"retry-after", str(int(settings.CIRCUIT_BREAKER_COOLDOWN_SECONDS)).encode())
            ],
        )
    if not avoid and len(allowed) == engine.replicas:
        return await replica_order(variant)
    preferred = await replica_order(variant) or tuple(range(engine.replicas))
    fresh = [r for r in preferred if r in allowed and r not in avoid]
    return tuple(fresh or [r for r in preferred if r in allowed])


Progress = Callable[[float], Awaitable[None]]


async def _entered(lease: ReplicaLease, progress: Progress | None) -> None:
    """Enter the lease (start or swap the replica if needed); while that takes longer than
    ENGINE_PROGRESS_SECONDS, call `progress(seconds waited)` every ENGINE_PROGRESS_SECONDS."""
    if progress is None:
        await lease.__aenter__()
        return
    entering = asyncio.ensure_future(lease.__aenter__())
    started = time.monotonic()
    try:
        while not entering.done():
            await asyncio.wait({entering}, timeout=settings.ENGINE_PROGRESS_SECONDS)
            if not entering.done():
                await progress(time.monotonic() - started)
    except BaseException:
        entering.cancel()
        with contextlib.suppress(BaseException):
            await entering
        if entering.done() and not entering.cancelled() and entering.exception() is None:
            await lease.__aexit__(None, None, None)
        raise
    entering.result()


@asynccontextmanager
async def replica_url(
    variant: VariantRoute, replica: int, progress: Progress | None = None
) -> AsyncIterator[str]:
    """Where to send the request: an external replica's root, or a managed replica that
    runs this variant (started or swapped to it first, `progress` called meanwhile), held
    in use while the block runs."""
    engine = variant.engine
    if not engine.managed:
        yield engine.base_urls[replica] if engine.base_urls else engine.base_url
        return
    try:
        lease = engine_manager.acquire(engine_id=engine.id, variant_id=variant.id, replica=replica)
        await _entered(lease, progress)
        try:
            yield lease.base_url
        finally:
            await lease.__aexit__(None, None, None)
    except EngineStartError as exc:
        raise ApiError(
            503,
            f"Engine `{engine.name}` could not start: {exc}",
            type="api_error",
            code="engine_unavailable",
            headers=[(b"retry-after", b"5")],
        ) from None


@dataclass(frozen=True, slots=True)
class EngineTarget:
    """Where one engine call goes: the engine, the replica's root URL, the slot held."""

    engine: EngineRoute
    base_url: str
    slot: int
    replica: int = 0


@asynccontextmanager
async def engine_slot(
    ctx: RequestContext,
    *,
    avoid: frozenset[int] = frozenset(),
    progress: Progress | None = None,
) -> AsyncIterator[EngineTarget]:
    """Wait for a slot on a replica (fair across tenants), then hold it and that replica
    (a managed one started or swapped to the variant first) while the block runs.
    `avoid`: replicas this request already failed on (placed elsewhere if possible);
    `progress`: called while a managed replica starts (see _entered)."""
    assert ctx.variant is not None
    variant = ctx.variant
    async with (
        _scheduled(ctx, avoid) as placement,
        replica_url(variant, placement.replica, progress) as base_url,
    ):
        yield EngineTarget(
            engine=variant.engine,
            base_url=base_url,
            slot=placement.slot,
            replica=placement.replica,
        )


@asynccontextmanager
async def _scheduled(ctx: RequestContext, avoid: frozenset[int]) -> AsyncIterator[Placement]:
    assert ctx.principal is not None
    assert ctx.variant is not None
    engine = ctx.variant.engine
    request = SlotRequest(
        engine.name,
        replicas=engine.replicas,
        slots=engine.slots,
        tenant=ctx.principal.tenant_slug,
        weight=ctx.principal.tenant_weight,
        session=ctx.session_id,
        # Waiting for the session's own slot pays only when its cached history would
        # take longer to recompute than someone else's answer takes.
        insist=ctx.history.tokens >= settings.SCHEDULER_STICKY_MIN_TOKENS,
        max_queue=settings.SCHEDULER_MAX_QUEUE,
        max_wait=settings.SCHEDULER_MAX_WAIT_SECONDS,
        replica_order=await healthy_replica_order(ctx.variant, avoid),
    )
    try:
        async with worker_scheduler().slot(request) as placement:
            yield placement
    except SchedulerBusy as busy:  # raised on entering: no slot within the bounds
        raise ApiError(
            503,
            f"Engine `{engine.name}` is busy ({busy.reason.replace('_', ' ')}); retry in {busy.retry_after}s.",
            type="api_error",
            code="engine_overloaded",
            headers=[(b"retry-after", str(busy.retry_after).encode())],
        ) from None


def pin_session_slot(ctx: RequestContext, target: EngineTarget) -> None:
    """A session's requests use the same llama.cpp slot, whose KV cache holds its history."""
    if ctx.session_id and target.engine.flavor == "llamacpp" and "id_slot" not in ctx.payload:
        ctx.payload["id_slot"] = target.slot
        ctx.payload_changed = True
