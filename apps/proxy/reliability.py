"""Riding over engine faults: retries before the first byte, model fallbacks, breakers.

An attempt is: a scheduler slot on a replica, the engine call, the answer relayed. Until
the first byte goes to the client, a connection failure or a 502/503/504 from the engine
is retried (ENGINE_RETRIES more attempts, exponential backoff with full jitter from
ENGINE_RETRY_BACKOFF_SECONDS, all within ENGINE_RETRY_MAX_SECONDS), on another replica
when there is one. Once a model's engines are down (retries spent, circuits open, a
managed start failing) or overloaded (503 `engine_overloaded`), the model's fallbacks are
tried in order (those the tenant may use), each with its own retries. Each replica's
successes and failures feed its circuit breaker (apps/engines/breaker.py).

The tool loop (tool_loop.py) runs each of its rounds' engine calls through `with_retries`
as a request of its own: each round has the retries and retry time above, retried while
nothing of that round reached the client. A fallback that took over serves the later
rounds too (the conversation goes on with the model that answered, which the tenant may
use); if it fails as well, the rest of the requested model's fallbacks are tried.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from django.conf import settings

from apps.core.context import RequestContext
from apps.core.errors import ApiError
from apps.engines.breaker import breaker
from apps.engines.registry import ModelRoute, registry
from apps.engines.stage import (
    EngineTarget,
    Progress,
    adapt_for_engine,
    choose_variant_by_size,
    engine_slot,
)
from apps.observability import metrics
from apps.observability.metrics import child

RETRY_STATUSES = frozenset({502, 503, 504})
# Errors that mean "this model cannot serve it now": the next fallback may.
FALLBACK_CODES = frozenset({"engine_unreachable", "engine_unavailable", "engine_overloaded"})

# Where the rest of the requested model's fallbacks wait (a tool loop's later rounds go on
# from where its earlier rounds left the chain).
FALLBACKS_LEFT = "fallbacks_left"

T = TypeVar("T")
MayRetry = Callable[[], bool]
# An attempt gets the replicas to avoid and a `may_retry()` that says whether an engine's
# 502/503/504 may become another attempt (retries or fallbacks left) or must be relayed.
Attempt = Callable[[frozenset[int], MayRetry], Awaitable[T]]
# The engine call of an attempt, in the slot it was given (see `engine_attempt`).
Call = Callable[[EngineTarget, MayRetry], Awaitable[T]]


class RetryableAnswer(Exception):
    """The engine answered 502/503/504 and the request may still go elsewhere."""

    def __init__(self, target: EngineTarget, status: int) -> None:
        super().__init__(f"engine answered {status}")
        self.target = target
        self.status = status


class RetryableFailure(Exception):
    """The engine could not be reached (nothing reached the client yet)."""

    def __init__(self, target: EngineTarget, error: ApiError) -> None:
        super().__init__(error.message)
        self.target = target
        self.error = error


@dataclass(slots=True)
class Budget:
    """What is left of the retries of one model, and of the request's retry time."""

    deadline: float
    retries: int = field(default_factory=lambda: settings.ENGINE_RETRIES)
    attempt: int = 0

    def can_retry(self) -> bool:
        return self.retries > 0 and time.monotonic() + self.delay(peek=True) < self.deadline

    def delay(self, *, peek: bool = False) -> float:
        base = settings.ENGINE_RETRY_BACKOFF_SECONDS * (2**self.attempt)
        return base if peek else random.uniform(0, base)  # full jitter

    async def wait(self, engine: str) -> None:
        metrics.RETRIES.labels(engine).inc()
        self.retries -= 1
        await asyncio.sleep(min(self.delay(), max(0.0, self.deadline - time.monotonic())))
        self.attempt += 1


async def fallback_routes(ctx: RequestContext) -> list[ModelRoute]:
    """The model's fallbacks the tenant may use, in order (unknown ones skipped)."""
    assert ctx.route is not None
    assert ctx.principal is not None
    if not ctx.route.fallbacks:
        return []
    snapshot = await registry.get()
    routes = [snapshot.models.get(name) for name in ctx.route.fallbacks]
    return [r for r in routes if r and r.variants and ctx.principal.may_use(r.id)]


async def switch_model(ctx: RequestContext, route: ModelRoute) -> None:
    """Serve the request with another model: its variant, its name for the engine, and
    `x-gateway-model` so the client knows who answered."""
    if "fallback_from" not in ctx.extras:
        ctx.extras["fallback_from"] = ctx.model
        ctx.response_filters.append(ServedBy())
    ctx.route, ctx.model, ctx.variant = route, route.name, route.variants[0]
    ctx.prompt_estimate, ctx.prompt_counted = 0, False
    await choose_variant_by_size(ctx)
    await adapt_for_engine(ctx)
    ctx.response_headers = [h for h in ctx.response_headers if h[0] != b"x-gateway-model"]
    ctx.response_headers.append((b"x-gateway-model", route.name.encode()))


class ServedBy:
    """A fallback's answer names the model that served it (`model`), whatever its engine
    writes there."""

    def whole(self, ctx: RequestContext, body: Any) -> Any:
        if isinstance(body, dict) and "model" in body:
            body["model"] = ctx.model
        return body

    def stream(self, ctx: RequestContext) -> _ServedByChunks:
        return _ServedByChunks(ctx.model)


class _ServedByChunks:
    def __init__(self, model: str) -> None:
        self.model = model

    def feed(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        if "model" in chunk:
            chunk["model"] = self.model
        return [chunk]

    def flush(self) -> list[dict[str, Any]]:
        return []


async def with_retries(ctx: RequestContext, attempt: Attempt[T]) -> T:
    """Run `attempt` for the request's model, then for each fallback, until one answers."""
    deadline = time.monotonic() + settings.ENGINE_RETRY_MAX_SECONDS
    fallbacks = await _fallbacks_left(ctx)
    # Replaced, not added: a tool loop calls this once per round.
    ctx.response_headers = [h for h in ctx.response_headers if h[0] != b"x-gateway-model"]
    ctx.response_headers.append((b"x-gateway-model", ctx.model.encode()))
    while True:
        try:
            budget = Budget(deadline=deadline)
            return await _model_attempts(ctx, attempt, budget, has_next=bool(fallbacks))
        except ApiError as err:
            if err.code not in FALLBACK_CODES or not fallbacks:
                raise
            requested = ctx.extras.get("fallback_from") or ctx.model
            await switch_model(ctx, fallbacks.pop(0))
            metrics.FALLBACKS.labels(requested, ctx.model).inc()


async def _fallbacks_left(ctx: RequestContext) -> list[ModelRoute]:
    """The fallbacks not tried yet: all the model's at the first call, then what earlier
    calls of the same request (a tool loop's rounds) left (the list they pop)."""
    if FALLBACKS_LEFT not in ctx.extras:
        ctx.extras[FALLBACKS_LEFT] = await fallback_routes(ctx)
    return ctx.extras[FALLBACKS_LEFT]


async def _model_attempts(
    ctx: RequestContext, attempt: Attempt[T], budget: Budget, *, has_next: bool
) -> T:
    """One model's attempts: retried while the budget lasts; the last one's failure is the
    client's answer (an engine's 5xx relayed as it is, when no fallback is left)."""
    avoid: set[int] = set()
    last: ApiError | None = None  # what went wrong before, if this attempt is a retry
    while True:
        try:
            return await attempt(frozenset(avoid), lambda: has_next or budget.can_retry())
        except ApiError as err:
            # The failures so far opened the circuit: their error is the answer, not
            # "circuit open" (which only a request arriving later gets).
            if last is not None and err.code == "engine_unavailable":
                raise last from None
            raise
        except RetryableAnswer as answer:
            failed(answer.target, f"HTTP {answer.status}")
            avoid.add(answer.target.replica)
            last = ApiError(
                503,
                f"Engine `{answer.target.engine.name}` answered {answer.status}.",
                type="api_error",
                code="engine_unavailable",
            )
            if not budget.can_retry():
                raise last from None
        except RetryableFailure as failure:
            failed(failure.target, failure.error.message)
            avoid.add(failure.target.replica)
            last = failure.error
            if not budget.can_retry():
                raise failure.error from None
        assert ctx.variant is not None
        await budget.wait(ctx.variant.engine.name)


def engine_attempt(
    ctx: RequestContext,
    call: Call[T],
    *,
    untouched: Callable[[], bool],
    progress: Progress | None = None,
) -> Attempt[T]:
    """The attempt of one engine call: a scheduler slot (away from the replicas that
    failed), `call` in it. An unreachable engine is retryable while `untouched()` (nothing
    of this call reached the client) and a slot was held (a scheduler refusal is not)."""

    async def attempt(avoid: frozenset[int], may_retry: MayRetry) -> T:
        assert ctx.variant is not None
        queued = child(metrics.QUEUED, ctx.variant.engine.name)
        queued.inc()
        waiting = True
        try:
            async with engine_slot(ctx, avoid=avoid, progress=progress) as target:
                queued.dec()
                waiting = False
                in_flight = child(metrics.IN_FLIGHT, target.engine.name)
                in_flight.inc()
                try:
                    return await call(target, may_retry)
                finally:
                    in_flight.dec()
        except ApiError as err:
            if err.code == "engine_unreachable" and untouched() and not waiting:
                raise RetryableFailure(target, err) from None
            raise
        finally:
            if waiting:
                queued.dec()

    return attempt


def check_answer(target: EngineTarget, status: int, may_retry: MayRetry) -> None:
    """An engine's answer status, before anything of it is relayed: a 502/503/504 becomes
    another attempt when `may_retry()`; either way the replica's breaker learns of it."""
    if status in RETRY_STATUSES:
        if may_retry():
            raise RetryableAnswer(target, status)
        failed(target, f"HTTP {status}")
    else:
        succeeded(target)


def failed(target: EngineTarget, error: str) -> None:
    breaker.failure(target.engine.name, target.replica, error)


def succeeded(target: EngineTarget) -> None:
    breaker.success(target.engine.name, target.replica)
