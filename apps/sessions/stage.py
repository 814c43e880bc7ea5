"""Pipeline stage for server-side chat history.

Before the engine: load the session's history and system prompt, trim the history to the
variant's context (in tokens), send [system] + history + new messages (the client's own
system messages first). The history stays the JSON text the database returned, spliced
into the engine's body (apps/core/context.py): its cost here does not grow with it,
however long the session. After a successful
answer, before the response completes: store the new messages and the reply with their
PP/TG/cache metrics.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass
from typing import Any

import orjson
import psycopg
from channels.db import database_sync_to_async
from django.conf import settings

from apps.core.context import RequestContext
from apps.core.errors import ApiError
from apps.engines.registry import VariantRoute
from apps.engines.stage import largest_variant
from apps.engines.tokens import (
    MESSAGE_OVERHEAD_TOKENS,
    MessageTokens,
    count_message_tokens,
    heuristic_message_tokens,
)
from apps.sessions import services as sessions
from apps.sessions import store
from apps.sessions.history_cache import history_cache

logger = logging.getLogger(__name__)

_open_alone = database_sync_to_async(store.open_now, thread_sensitive=False)
_record_alone = database_sync_to_async(store.record_now, thread_sensitive=False)


async def _load(
    *, tenant_id: int, external_id: str, variant: VariantRoute
) -> sessions.SessionContext:
    """The session, opened in the next batch (alone on a thread if that batch fails), with
    only the history that could fit the variant's context: of it, only what this process
    does not hold yet comes back (apps/sessions/history_cache.py)."""
    cache = history_cache()
    request = cache.request(
        store.open_item(tenant_id=tenant_id, external_id=external_id, cap=variant.ctx_size)
    )
    try:
        row = await asyncio.shield(store.open_batcher.submit(orjson.dumps(request.item)))
    except psycopg.Error:
        logger.warning("session open batch failed; opening alone", exc_info=True)
        row = await _open_alone(request.item)
    return sessions.session_context(
        row, variant_system_prompt=variant.system_prompt, history=cache.opened(request, row)
    )


async def session_store_close() -> None:
    """Close the batch connections (shutdown)."""
    await store.open_batcher.close()
    await store.record_batcher.close()


async def _record(item: dict[str, Any]) -> None:
    try:
        await asyncio.shield(store.record_batcher.submit(store.serialized(item)))
    except psycopg.Error:
        logger.warning("session record batch failed; recording alone", exc_info=True)
        await _record_alone(item)


@dataclass
class SessionTurn:
    session_pk: int
    new_messages: list[dict[str, Any]]
    token_counts: dict[int, int]
    variant: VariantRoute
    # Counted by the heuristic where the count matters (a managed engine that was not
    # running yet): recount with the engine's tokenizer before storing.
    recount: bool


def session_id_of(header: bytes | None, payload: dict[str, Any]) -> str | None:
    try:
        return sessions.session_id_from_request(
            header=header.decode("latin-1") if header is not None else None, payload=payload
        )
    except sessions.InvalidSessionId as exc:
        raise ApiError(400, str(exc), param=exc.param, code="invalid_session_id") from None


def completion_reserve(payload: dict[str, Any]) -> int:
    """Tokens to keep free for the answer: the client's max_tokens, else the default."""
    for name in ("max_completion_tokens", "max_tokens"):
        if isinstance(payload.get(name), int):
            return payload[name]
    return settings.DEFAULT_MAX_TOKENS


async def session_identify(ctx: RequestContext) -> None:
    """The request's session id, from `X-Session-Id` or metadata.session_id (400 if it is
    malformed): known to the stages between this one and session_open (RAG's per-session
    setting)."""
    ctx.session_id = session_id_of(ctx.header(b"x-session-id"), ctx.payload)


async def session_open(ctx: RequestContext) -> None:
    """With a session id (session_identify): send the stored history along, trimmed to the
    model's largest context, and store the new turn once the answer is in."""
    if ctx.session_id is None:
        return
    assert ctx.route is not None
    turn = await session_prepare(
        ctx=ctx,
        external_id=ctx.session_id,
        payload=ctx.payload,
        variant=largest_variant(ctx.route),
    )
    ctx.payload_changed = True
    ctx.before_finish.append(functools.partial(session_record, ctx=ctx, turn=turn))
    ctx.on_refusal.append(functools.partial(session_record_refusal, ctx=ctx, turn=turn))
    ctx.response_headers.append((b"x-session-id", ctx.session_id.encode()))


async def session_prepare(
    *, ctx: RequestContext, external_id: str, payload: dict[str, Any], variant: VariantRoute
) -> SessionTurn:
    """payload["messages"] becomes [system prompt] + the new messages, and `ctx.history`
    the stored history that fits the variant's context with them (oldest turns dropped
    first), which the engine gets after the leading system messages."""
    assert ctx.principal is not None
    context = await _load(
        tenant_id=ctx.principal.tenant_id, external_id=external_id, variant=variant
    )
    new_messages = payload["messages"]
    budget = None
    if variant.ctx_size:
        budget = max(1, variant.ctx_size - completion_reserve(payload) - ctx.added_prompt_tokens)
        counted = await count_message_tokens(variant, new_messages, model=ctx.model)
    else:
        # No context size: nothing is ever trimmed for this model, so the engine is not
        # asked; the stored counts are estimates (exact enough if the session moves on).
        counted = MessageTokens([heuristic_message_tokens(m) for m in new_messages], exact=False)
    head = sessions.prompt_head(context.system_prompt, new_messages)
    payload["messages"] = [*head, *new_messages]
    fixed = sum(counted.counts) + sum(heuristic_message_tokens(m) for m in head)
    ctx.history = sessions.history_trim(context.history, fixed_tokens=fixed, budget_tokens=budget)
    ctx.wants_reply = True
    return SessionTurn(
        session_pk=context.session_pk,
        new_messages=new_messages,
        token_counts=dict(enumerate(counted.counts)),
        variant=variant,
        recount=budget is not None and not counted.exact,
    )


def turn_metrics(ctx: RequestContext) -> sessions.TurnMetrics:
    """PP/TG figures from the engine's usage and timings, else as the gateway saw them."""
    timings = ctx.timings or {}
    cached = ctx.cached_tokens
    pp_tokens = int(timings.get("prompt_n", max(0, ctx.prompt_tokens - cached)))
    pp_started = ctx.sent_at
    pp_finished = ctx.first_token_at
    if ctx.sent_at is not None and "prompt_ms" in timings:
        pp_finished = ctx.sent_at + float(timings["prompt_ms"]) / 1000
    tg_started = ctx.first_token_at if ctx.stream else pp_finished
    tg_finished = ctx.last_token_at if ctx.stream else ctx.received_at
    if not ctx.stream and pp_finished is not None and "predicted_ms" in timings:
        tg_finished = pp_finished + float(timings["predicted_ms"]) / 1000
    return sessions.TurnMetrics(
        prompt_tokens=ctx.prompt_tokens,
        cached_tokens=cached,
        pp_tokens=pp_tokens,
        pp_started_at=ctx.wall(pp_started),
        pp_finished_at=ctx.wall(pp_finished),
        tg_tokens=ctx.completion_tokens,
        tg_started_at=ctx.wall(tg_started),
        tg_finished_at=ctx.wall(tg_finished),
    )


async def session_record(*, ctx: RequestContext, turn: SessionTurn) -> None:
    if turn.recount:
        # The engine runs now: store what its tokenizer says, or later trimming is off.
        recounted = await count_message_tokens(turn.variant, turn.new_messages, model=ctx.model)
        if recounted.exact:
            turn.token_counts = dict(enumerate(recounted.counts))
    if ctx.reply is None:
        return  # nothing was generated: the turn is not stored (no question without answer)
    item = store.turn_item(
        session_pk=turn.session_pk,
        new_messages=[*turn.new_messages, *ctx.tool_exchange],
        reply=ctx.reply,
        model=ctx.model,
        metrics=turn_metrics(ctx),
        token_counts=turn.token_counts,
        # As history, the reply costs its tokens plus the template's role markers.
        reply_tokens=ctx.completion_tokens + MESSAGE_OVERHEAD_TOKENS,
    )
    await _record(item)


REFUSED_MESSAGE_NOTE = "[This message was refused by a safety rule; its text is not kept.]"


async def session_record_refusal(err: ApiError, *, ctx: RequestContext, turn: SessionTurn) -> None:
    """A request refused for its content is stored as a turn that says so: a note instead
    of the client's message (never the refused text) and the refusal as the reply."""
    note = {"role": "user", "content": REFUSED_MESSAGE_NOTE}
    reply = {"role": "assistant", "content": err.message}
    item = store.turn_item(
        session_pk=turn.session_pk,
        new_messages=[note],
        reply=reply,
        model=ctx.model,
        metrics=turn_metrics(ctx),
        token_counts={0: heuristic_message_tokens(note)},
        reply_tokens=heuristic_message_tokens(reply),
    )
    await _record(item)
