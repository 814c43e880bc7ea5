"""The /v1 request pipeline, in one place.

A request is a RequestContext (apps/core/context.py) passed through an endpoint's stages in
order; each stage is `async def stage(ctx) -> None`, owned by its app, and raises ApiError
to refuse. Then the engine is called in a scheduler slot and the answer goes to the client
through the response filters the stages added (tool-call parsing, ...), and, whatever
happened, the request is settled: the quota charged what was really used, the request
logged.

    chat completions:  authenticate → admit → validate → resolve model → tool-call parsing
                       → session → size/choose variant → adapt for the engine → quota
                       → streaming → [schedule → engine call → response filters → respond]
                       → settle (quota, request log)

Adding a capability is adding its stage to a tuple below (and, to see the answer, a
ResponseFilter it appends to `ctx.response_filters`), not editing the consumers.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from django.utils import timezone

from apps.core.context import RequestContext
from apps.engines.stage import (
    adapt_for_engine,
    choose_variant_by_size,
    engine_slot,
    pin_session_slot,
    resolve_model,
    tool_call_parsing,
)
from apps.proxy import validation
from apps.proxy.engine_call import (
    engine_response,
    is_event_stream,
    stream_events,
    stream_headers,
    stream_relay,
    whole_answer,
)
from apps.proxy.responder import Responder
from apps.quotas.stage import quota_reserve, quota_settle
from apps.request_logs.writer import log_row, request_log_writer
from apps.sessions.stage import session_open
from apps.tenants.stage import admit, authenticate

Stage = Callable[[RequestContext], Awaitable[None]]
Validator = Callable[[dict[str, Any]], None]


@dataclass(frozen=True, slots=True)
class Pipeline:
    endpoint: str  # as request logs name it
    upstream_path: str
    stages: tuple[Stage, ...]


def validated(check: Validator) -> Stage:
    """The stage that parses the body as a JSON object and checks it (400 otherwise)."""

    async def validate(ctx: RequestContext) -> None:
        ctx.payload = validation.parse_json_object(ctx.body)
        check(ctx.payload)

    validate.__name__ = f"validate_{check.__name__.removeprefix('validate_')}"
    return validate


async def streaming(ctx: RequestContext) -> None:
    """A streamed request: the engine always reports usage; the client sees it only if it
    asked for it."""
    if ctx.payload.get("stream") is not True:
        return
    ctx.stream = True
    options = ctx.payload.get("stream_options") or {}
    ctx.client_wants_usage = options.get("include_usage") is True
    ctx.payload["stream_options"] = {**options, "include_usage": True}
    ctx.payload_changed = True


CHAT_COMPLETIONS = Pipeline(
    endpoint="chat.completions",
    upstream_path="/v1/chat/completions",
    stages=(
        authenticate,
        admit,
        validated(validation.validate_chat),
        resolve_model,
        tool_call_parsing,
        session_open,
        choose_variant_by_size,
        adapt_for_engine,
        quota_reserve,
        streaming,
    ),
)

COMPLETIONS = Pipeline(
    endpoint="completions",
    upstream_path="/v1/completions",
    stages=(
        authenticate,
        admit,
        validated(validation.validate_completion),
        resolve_model,
        choose_variant_by_size,
        adapt_for_engine,
        quota_reserve,
        streaming,
    ),
)

EMBEDDINGS = Pipeline(
    endpoint="embeddings",
    upstream_path="/v1/embeddings",
    stages=(
        authenticate,
        admit,
        validated(validation.validate_embedding),
        resolve_model,
        adapt_for_engine,
        quota_reserve,
    ),
)


async def run_pipeline(pipeline: Pipeline, ctx: RequestContext, responder: Responder) -> None:
    for stage in pipeline.stages:
        await stage(ctx)
    await answer(ctx, responder, path=pipeline.upstream_path)


async def answer(ctx: RequestContext, responder: Responder, *, path: str) -> None:
    """Schedule, call the engine, and send its answer (whole, or streamed as it comes)."""
    async with engine_slot(ctx) as target:
        pin_session_slot(ctx, target)
        body = orjson.dumps(ctx.payload) if ctx.payload_changed else ctx.body
        async with engine_response(ctx, target, path=path, body=body) as resp:
            if is_event_stream(ctx, resp):
                await responder.start_stream(status=resp.status, headers=stream_headers(ctx, resp))
                async for events in stream_events(ctx, resp, stream_relay(ctx), target.engine):
                    await responder.write(events)
                await ctx.finish()
                await responder.end_stream()
                return
            whole = await whole_answer(ctx, resp)
            # Stored before the headers go out: if storing fails, the client gets a clean 500.
            await ctx.finish()
            await responder.send_whole(whole)


def settle(ctx: RequestContext) -> None:
    """Whatever happened: charge the quota what was used, log the request (if a tenant is
    known: 401s are not logged, see README)."""
    quota_settle(ctx)
    if ctx.principal is not None:
        request_log_writer.add(request_log_row(ctx))


def request_log_row(ctx: RequestContext) -> tuple:
    assert ctx.principal is not None
    ttft = None
    if ctx.first_token_at is not None:
        ttft = (ctx.first_token_at - ctx.started) * 1000
    return log_row(
        created_at=timezone.now(),
        tenant_id=ctx.principal.tenant_id,
        api_key_id=ctx.principal.key_id,
        endpoint=ctx.endpoint,
        model=ctx.model,
        engine=ctx.engine,
        stream=ctx.stream,
        status_code=ctx.status,
        error_code=ctx.error_code,
        prompt_tokens=ctx.prompt_tokens,
        completion_tokens=ctx.completion_tokens,
        cached_tokens=ctx.cached_tokens,
        usage_estimated=ctx.usage_estimated,
        client_disconnected=ctx.client_disconnected,
        ttft_ms=ttft,
        latency_ms=(time.perf_counter() - ctx.started) * 1000,
        cost=ctx.extras.get("cost"),  # set by quota_settle (apps/quotas/stage.py)
    )
