"""The quota stage of the async /v1 pipeline: how much to reserve, reserve, settle.

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
from typing import Any

import psycopg
from channels.db import database_sync_to_async
from django.conf import settings
from django.db import connections
from django.utils import timezone
from psycopg.conninfo import make_conninfo
from psycopg_pool import AsyncConnectionPool

from apps.quotas.errors import quota_exceeded_error
from apps.quotas.services import (
    RESERVE_SQL,
    SETTLE_SQL,
    QuotaExceeded,
    ReservationTicket,
    quota_reserve,
    reserve_params,
    sweep_due,
    sweep_now,
    ticket_from_rows,
)
from apps.quotas.state import QuotaState, human_duration

logger = logging.getLogger(__name__)

_reserve = database_sync_to_async(quota_reserve, thread_sensitive=False)
_settling: set[asyncio.Task] = set()


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
    *, tenant_id: int, api_key_id: int, tokens: int, quotas: list
) -> ReservationTicket:
    """Reserve, or raise the OpenAI-shaped 429 `insufficient_quota` (with Retry-After).

    One statement on the event loop's own connection pool: no thread hop, and the windows'
    row locks are held only inside PostgreSQL.
    """
    _sweep_in_background_if_due()
    now = timezone.now()
    params = reserve_params(
        tenant_id=tenant_id, api_key_id=api_key_id, tokens=tokens, quotas=quotas, now=now
    )
    try:
        async with (await _pool()).connection() as conn:
            rows = await (await conn.execute(RESERVE_SQL, params)).fetchall()
        return ticket_from_rows(rows, params=params, quotas=quotas, now=now)
    except QuotaExceeded as exc:
        raise quota_exceeded_error(exc) from exc
    except psycopg.IntegrityError:
        # A quota was deleted since the caller's lookup: look again, the slow way, once.
        return await _reserve_fresh(tenant_id=tenant_id, api_key_id=api_key_id, tokens=tokens)


async def _reserve_fresh(*, tenant_id: int, api_key_id: int, tokens: int) -> ReservationTicket:
    try:
        return await _reserve(tenant_id=tenant_id, api_key_id=api_key_id, tokens=tokens)
    except QuotaExceeded as exc:
        raise quota_exceeded_error(exc) from exc


def quota_stage_settle(ticket: ReservationTicket | None, *, actual_tokens: int) -> None:
    """Settle in the background (0 tokens releases). Safe to call from `finally` of a
    cancelled task and more than once (settling is idempotent)."""
    if ticket is None or ticket.reservation_id is None:
        return
    task = asyncio.get_running_loop().create_task(_settle_logged(ticket, max(0, actual_tokens)))
    _settling.add(task)
    task.add_done_callback(_settling.discard)


async def _settle_logged(ticket: ReservationTicket, actual_tokens: int) -> None:
    try:
        async with (await _pool()).connection() as conn:
            await conn.execute(SETTLE_SQL, [ticket.reservation_id, actual_tokens])
    except Exception:
        # The sweep gives the reservation back after the TTL; the usage would be lost.
        logger.exception("could not settle quota reservation %s", ticket.reservation_id)


async def quota_stage_drain() -> None:
    """Wait for settlements in flight, then close the pool (shutdown)."""
    global _pool_instance
    while _settling:
        await asyncio.gather(*list(_settling), return_exceptions=True)
    if _pool_instance is not None:
        await _pool_instance.close()
        _pool_instance = None


_pool_instance: AsyncConnectionPool | None = None
_pool_lock = asyncio.Lock()


async def _pool() -> AsyncConnectionPool:
    """This process's small async pool for the two hot quota statements (autocommit: each
    statement is its own transaction)."""
    global _pool_instance
    if _pool_instance is None:
        async with _pool_lock:
            if _pool_instance is None:
                pool = AsyncConnectionPool(
                    _conninfo(),
                    min_size=1,
                    max_size=settings.QUOTA_POOL_SIZE,
                    kwargs={"autocommit": True},
                    open=False,
                )
                await pool.open()
                _pool_instance = pool
    return _pool_instance


def _conninfo() -> str:
    """libpq connection string of Django's default database (same server, same options)."""
    db = connections["default"].get_connection_params()
    db.pop("cursor_factory", None)
    db.pop("context", None)
    db.pop("prepare_threshold", None)
    return make_conninfo(**{k: v for k, v in db.items() if v not in (None, "")})


def _sweep_in_background_if_due() -> None:
    if sweep_due():
        task = asyncio.get_running_loop().create_task(_sweep())
        _settling.add(task)
        task.add_done_callback(_settling.discard)


_sweep = database_sync_to_async(sweep_now, thread_sensitive=False)


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
