"""The quota stage of the async /v1 pipeline: how much to reserve, reserve, settle.

In the pipeline: `quota_reserve(ctx)` before the engine is called, `quota_settle(ctx)` once
the request is over (whatever happened). Underneath:

    ticket = await quota_stage_reserve(tenant_id=..., api_key_id=..., tokens=...)  # or 429
    try:
        ... call the engine ...
    finally:
        quota_stage_settle(ticket, actual_tokens=prompt + completion)  # 0 if no engine work

Settling runs as a background task: it never delays the response, and it still runs when
the request task is being cancelled (client disconnect). `quota_stage_drain()` awaits the
ones in flight (call it at shutdown, next to the request-log flush).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from datetime import datetime
from functools import partial
from typing import Any

import orjson
import psycopg
from channels.db import database_sync_to_async
from django.conf import settings
from django.utils import timezone

from apps.core.context import RequestContext
from apps.core.errors import ApiError
from apps.engines.sizing import TOKENIZE, prompt_token_bound, prompt_tokens
from apps.engines.stage import GENERATING_ENDPOINTS
from apps.quotas import services
from apps.quotas.batching import reserve_batcher, settle_batcher
from apps.quotas.costs import actual_cost, max_cost, money, prices_of
from apps.quotas.errors import budget_exceeded_error, quota_exceeded_error
from apps.quotas.leases import lease_book
from apps.quotas.periods import window_start
from apps.quotas.services import (
    ApplicableQuota,
    QuotaExceeded,
    ReservationTicket,
    reserve_params,
    sweep_due,
    sweep_now,
    ticket_from_rows,
)
from apps.quotas.state import QuotaState, human_duration
from apps.tenants.auth import Principal

logger = logging.getLogger(__name__)

# The services' own reserve and settle, on a thread (this module's names are the stages').
_reserve = database_sync_to_async(services.quota_reserve, thread_sensitive=False)
_settle = database_sync_to_async(services.quota_settle, thread_sensitive=False)
_settling: set[asyncio.Task] = set()


def principal_quotas(principal: Principal) -> tuple[ApplicableQuota, ...]:
    """The token quotas that apply to the caller, loaded with its key (QuotasConfig.ready)."""
    return principal.attachments.get("quotas", ())


def principal_budgets(principal: Principal) -> tuple[ApplicableQuota, ...]:
    """The cost budgets (unit=cost quotas) that apply to the caller, loaded with its key."""
    return principal.attachments.get("budgets", ())


# ctx.extras keys: this stage's own, and "cost" (Decimal or None) for the request log.
PRICES = "quotas.prices"
BUDGET_TICKET = "quotas.budget_ticket"
COST = "cost"


def tokens_to_reserve(
    payload: dict[str, Any], *, prompt_tokens: int, ctx_size: int | None, completes: bool = True
) -> int:
    """The most a request can cost: its prompt plus the completion tokens it may get.

    The completion budget is max_completion_tokens or max_tokens (times `n` choices), else
    what the context leaves after the prompt (DEFAULT_MAX_TOKENS when the context size is
    unknown); 0 for embeddings (`completes=False`). Settlement charges the real usage either way; reserving the worst
    case is what keeps used + reserved within the limit.
    """
    if not completes:
        return max(0, prompt_tokens)
    budget = _int(payload.get("max_completion_tokens"))
    if budget is None:
        budget = _int(payload.get("max_tokens"))
    if budget is None:
        # No max_tokens: the engine may generate until the context is full; unknown context
        # size: the configured default answer budget.
        budget = max(0, ctx_size - prompt_tokens) if ctx_size else settings.DEFAULT_MAX_TOKENS
    choices = _int(payload.get("n")) or 1
    return max(0, prompt_tokens) + max(0, budget) * max(1, choices)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


async def quota_stage_reserve(
    *,
    tenant_id: int,
    api_key_id: int,
    tokens: int,
    quotas: list | None = None,
    exceeded: Callable[[QuotaExceeded], ApiError] = quota_exceeded_error,
) -> ReservationTicket:
    """Reserve, or raise the OpenAI-shaped 429 `insufficient_quota` (with Retry-After).

    With the applicable `quotas` known (cached with the key), the tokens come from this
    process's leases (leases.py) or the reservation joins the next batch (batching.py);
    without them, or if the batch fails, it runs alone on a worker thread."""
    try:
        if quotas:
            return await _reserve_leased_or_batched(tenant_id, api_key_id, tokens, quotas)
        return await _reserve(
            tenant_id=tenant_id, api_key_id=api_key_id, tokens=tokens, quotas=quotas
        )
    except QuotaExceeded as exc:
        raise exceeded(exc) from exc


async def _reserve_leased_or_batched(
    tenant_id: int, api_key_id: int, tokens: int, quotas: list
) -> ReservationTicket:
    """From this process's leases when they have room (no round trip), else alone in
    PostgreSQL; a window with plenty left is then leased for the next requests."""
    now = timezone.now()
    starts = [window_start(period, now) for _, period, *_ in quotas]
    hold = lease_book.take(quotas=quotas, starts=starts, tokens=tokens)
    if hold is not None:
        states = lease_book.states(hold, quotas)
        return ReservationTicket(reservation_id=None, tokens=tokens, states=states, lease=hold)
    try:
        ticket = await _reserve_batched(tenant_id, api_key_id, tokens, quotas, now)
    except QuotaExceeded:
        # Spare tokens of our own leases may be what is missing: give them back, once.
        if not await lease_book.give_back(quotas=quotas, starts=starts, tokens=tokens):
            raise
        ticket = await _reserve_batched(tenant_id, api_key_id, tokens, quotas, now)
    lease_book.offer(
        tenant_id=tenant_id, quotas=quotas, starts=starts, tokens=tokens, states=ticket.states
    )
    return ticket


async def _reserve_batched(
    tenant_id: int, api_key_id: int, tokens: int, quotas: list, now: datetime
) -> ReservationTicket:
    _sweep_in_background()
    params = reserve_params(
        tenant_id=tenant_id, api_key_id=api_key_id, tokens=tokens, quotas=quotas, now=now
    )
    item = {
        "id": str(params[0]),
        "tenant": tenant_id,
        "key": api_key_id,
        "tokens": tokens,
        "quotas": params[4],
        "starts": [start.isoformat() for start in params[5]],
    }
    future = reserve_batcher.submit(orjson.dumps(item))
    try:
        rows = await asyncio.shield(future)
    except asyncio.CancelledError:
        # The client left while the batch ran: give back whatever it was granted.
        future.add_done_callback(partial(_release_orphan, params[0]))
        raise
    except psycopg.Error:
        logger.warning("quota reservation batch failed; reserving alone", exc_info=True)
        return await _reserve(
            tenant_id=tenant_id, api_key_id=api_key_id, tokens=tokens, quotas=quotas
        )
    return ticket_from_rows(rows, params=params, quotas=quotas, now=now)


def _release_orphan(reservation_id: uuid.UUID, future: asyncio.Future) -> None:
    if not future.cancelled() and future.exception() is None and future.result():
        granted = all(row[4] for row in future.result())
        if granted:
            quota_stage_settle(
                ReservationTicket(reservation_id=reservation_id, tokens=0), actual_tokens=0
            )


def _sweep_in_background() -> None:
    """The stale-reservation sweep, at most once a minute per process, off the request."""
    if sweep_due():
        task = asyncio.ensure_future(_sweep())
        _settling.add(task)
        task.add_done_callback(_settling.discard)


_sweep = database_sync_to_async(sweep_now, thread_sensitive=False)


def quota_stage_settle(ticket: ReservationTicket | None, *, actual_tokens: int) -> None:
    """Settle in the background (0 tokens releases). Safe to call from `finally` of a
    cancelled task and more than once (settling is idempotent)."""
    if ticket is not None and ticket.lease is not None:
        lease_book.settle(ticket.lease, actual_tokens=max(0, actual_tokens))
        return
    if ticket is None or ticket.reservation_id is None:
        return
    task = asyncio.get_running_loop().create_task(_settle_logged(ticket, max(0, actual_tokens)))
    _settling.add(task)
    task.add_done_callback(_settling.discard)


async def _settle_logged(ticket: ReservationTicket, actual_tokens: int) -> None:
    try:
        await settle_batcher.submit((str(ticket.reservation_id), actual_tokens))
    except psycopg.Error:
        logger.warning("quota settlement batch failed; settling alone", exc_info=True)
        try:
            await _settle(ticket=ticket, actual_tokens=actual_tokens, with_states=False)
        except Exception:
            # The sweep gives the reservation back after the TTL; the usage would be lost.
            logger.exception("could not settle quota reservation %s", ticket.reservation_id)


async def quota_stage_drain() -> None:
    """Wait for settlements in flight, then close the batch connections (shutdown)."""
    while _settling:
        await asyncio.gather(*list(_settling), return_exceptions=True)
    await lease_book.close()
    await reserve_batcher.close()
    await settle_batcher.close()


def quota_headers(states: list[QuotaState]) -> list[tuple[bytes, bytes]]:
    """OpenAI's x-ratelimit-*-tokens headers for the tightest quota (least remaining)."""
    if not states:
        return []
    tightest = min(states, key=lambda state: state.remaining)
    headers = [
        (b"x-ratelimit-limit-tokens", str(tightest.limit).encode()),
        (b"x-ratelimit-remaining-tokens", str(tightest.remaining).encode()),
    ]
    if tightest.resets_at is not None:
        seconds = (tightest.resets_at - timezone.now()).total_seconds()
        headers.append((b"x-ratelimit-reset-tokens", human_duration(seconds).encode()))
    return headers


async def quota_reserve(ctx: RequestContext) -> None:
    """Reserve the most this request can cost, in tokens and in money (429 if a quota or
    a cost budget cannot cover it).

    The prompt counts as sizing counted it, else as an upper bound of it (its bytes),
    else the heuristic, so the engine is not asked on every request. Only when that
    does not fit is the engine's tokenizer asked, and the exact count tried, so a quota
    or budget that is nearly used up still admits what really fits."""
    assert ctx.principal is not None
    assert ctx.variant is not None
    ctx.extras[PRICES] = await prices_of(ctx.model)
    if not principal_quotas(ctx.principal) and not _budgets_apply(ctx):
        return
    prompt = ctx.prompt_estimate
    if not ctx.prompt_counted:
        prompt = max(prompt, prompt_token_bound(ctx.payload, ctx.endpoint, ctx.history) or 0)
    try:
        await _reserve_for(ctx, prompt)
    except ApiError as err:
        if err.code != "insufficient_quota" or ctx.prompt_counted:
            raise
        exact, method = await prompt_tokens(
            ctx.variant, ctx.payload, ctx.endpoint, model=ctx.model, history=ctx.history
        )
        if method != TOKENIZE or exact >= prompt:
            raise
        ctx.prompt_estimate, ctx.prompt_counted = exact, True
        await _reserve_for(ctx, exact)


def _budgets_apply(ctx: RequestContext) -> bool:
    """Budgets limit priced models only: a model without a price costs nothing."""
    assert ctx.principal is not None
    return bool(principal_budgets(ctx.principal)) and ctx.extras.get(PRICES) is not None


async def _reserve_for(ctx: RequestContext, prompt: int) -> None:
    assert ctx.principal is not None
    assert ctx.variant is not None
    tokens = tokens_to_reserve(
        ctx.payload,
        prompt_tokens=prompt,
        ctx_size=ctx.variant.ctx_size,
        completes=ctx.endpoint in GENERATING_ENDPOINTS,
    )
    who = {"tenant_id": ctx.principal.tenant_id, "api_key_id": ctx.principal.key_id}
    quotas = list(principal_quotas(ctx.principal))
    ticket = None
    if quotas:
        ticket = await quota_stage_reserve(**who, tokens=tokens, quotas=quotas)
    if _budgets_apply(ctx):
        cost = max_cost(ctx.extras[PRICES], prompt_tokens=prompt, completion_tokens=tokens - prompt)
        try:
            ctx.extras[BUDGET_TICKET] = await quota_stage_reserve(
                **who,
                tokens=cost,
                quotas=list(principal_budgets(ctx.principal)),
                exceeded=budget_exceeded_error,
            )
        except BaseException:
            quota_stage_settle(ticket, actual_tokens=0)  # the tokens go back at once
            raise
    ctx.quota_ticket = ticket
    if ticket is not None:
        ctx.response_headers += quota_headers(ticket.states)


def quota_settle(ctx: RequestContext) -> None:
    """Charge what the engine really worked on (nothing if it never did), in tokens and
    in money; the rest of each reservation goes back. Idempotent: a ticket is settled
    once. Leaves the request's cost in ctx.extras["cost"] (None: the model is free)."""
    ticket, ctx.quota_ticket = ctx.quota_ticket, None
    quota_stage_settle(ticket, actual_tokens=ctx.spent_tokens)
    prices = ctx.extras.get(PRICES)
    cost = 0
    if prices is not None and ctx.usage_recorded:
        cost = actual_cost(
            prices,
            prompt_tokens=ctx.prompt_tokens,
            cached_tokens=ctx.cached_tokens,
            completion_tokens=ctx.completion_tokens,
        )
    ctx.extras[COST] = money(cost) if prices is not None else None
    quota_stage_settle(ctx.extras.pop(BUDGET_TICKET, None), actual_tokens=cost)
