"""The /v1 request pipeline, in one place.

A request is a RequestContext (apps/core/context.py) passed through an endpoint's stages in
order; each stage is `async def stage(ctx) -> None`, owned by its app, and raises ApiError
to refuse. Then the engine is called in a scheduler slot and the answer goes to the client
through the response filters the stages added (tool-call parsing, ...), and, whatever
happened, the request is settled: the quota charged what was really used, the request
logged.

    chat completions:  authenticate → admit → validate → built-in tools → resolve model
                       → input limits → tool-call parsing → session id
                       → RAG retrieval → session → safety (prompt rules; response/tool
                       hooks) → RAG sources injected → size/choose variant → adapt for
                       the engine → cache → quota → streaming
                       → [schedule → engine call → response filters → respond]
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

from apps.cache.stage import cache_state, response_cache
from apps.core.context import RequestContext, engine_body
from apps.engines.stage import (
    EngineTarget,
    adapt_for_engine,
    choose_variant_by_size,
    pin_session_slot,
    resolve_model,
    tool_call_parsing,
)
from apps.observability import tracing
from apps.observability.recording import record_request
from apps.proxy import validation
from apps.proxy.cached import cached_hit, send_cached, unless_cached
from apps.proxy.engine_call import (
    engine_response,
    is_event_stream,
    stream_events,
    stream_headers,
    stream_relay,
    whole_answer,
)
from apps.proxy.limits import input_limits
from apps.proxy.progress import loading_progress
from apps.proxy.reliability import MayRetry, check_answer, engine_attempt, with_retries
from apps.proxy.responder import Responder
from apps.proxy.sse import error_event
from apps.proxy.tool_loop import answer_with_tools
from apps.quotas.stage import quota_reserve, quota_settle
from apps.rag.stage import rag_inject, rag_retrieve
from apps.request_logs.writer import log_row, request_log_writer
from apps.safety.stage import safety_action, safety_prompt, whole_precheck
from apps.sessions.stage import session_identify, session_open
from apps.tenants.stage import admit, authenticate
from apps.tools.stage import built_in_tools

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


async def sources_on_session_reply(ctx: RequestContext) -> None:
    """Glue of two stages that never import each other (rag, sessions): the RAG sources a
    reply was given are stored with it in the session, as its `sources` field."""
    turn = ctx.extras.get("rag")
    if turn is None or not turn.hits or ctx.session_id is None:
        return

    async def add_sources() -> None:
        if ctx.reply is not None:
            ctx.reply = {**ctx.reply, "sources": turn.sources()}

    ctx.before_finish.insert(0, add_sources)  # before the session stores the reply


CHAT_COMPLETIONS = Pipeline(
    endpoint="chat.completions",
    upstream_path="/v1/chat/completions",
    stages=(
        authenticate,
        admit,
        validated(validation.validate_chat),
        built_in_tools,
        resolve_model,
        input_limits,
        tool_call_parsing,
        session_identify,
        rag_retrieve,
        session_open,
        safety_prompt,
        rag_inject,
        sources_on_session_reply,
        choose_variant_by_size,
        adapt_for_engine,
        response_cache,
        unless_cached(quota_reserve),
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
        input_limits,
        safety_prompt,
        choose_variant_by_size,
        adapt_for_engine,
        response_cache,
        unless_cached(quota_reserve),
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
        input_limits,
        adapt_for_engine,
        response_cache,
        unless_cached(quota_reserve),
    ),
)


async def run_pipeline(pipeline: Pipeline, ctx: RequestContext, responder: Responder) -> None:
    if tracing.tracer is not None:
        return await _run_traced(pipeline, ctx, responder)
    for stage in pipeline.stages:
        await stage(ctx)
    await answer(ctx, responder, path=pipeline.upstream_path)


async def _run_traced(pipeline: Pipeline, ctx: RequestContext, responder: Responder) -> None:
    """The same loop with a span per stage (only while tracing is on)."""
    for stage in pipeline.stages:
        with tracing.stage_span(stage.__name__):
            await stage(ctx)
    with tracing.stage_span("engine_call") as span:
        await answer(ctx, responder, path=pipeline.upstream_path)
        span.set_attribute("gateway.engine", ctx.engine)


async def answer(ctx: RequestContext, responder: Responder, *, path: str) -> None:
    """Schedule, call the engine, and send its answer (whole, or streamed as it comes);
    retried, or served by a fallback model, while nothing reached the client
    (reliability.py). A response cache hit is sent instead (cached.py)."""
    hit = cached_hit(ctx)
    if hit is not None:
        return await send_cached(ctx, responder, hit)
    tools = ctx.extras.get("tools")
    if tools is not None:  # built-in tools offered: the tool loop calls the engine by rounds
        await answer_with_tools(ctx, responder, path=path, tools=tools, settle=settle)
        return

    async def call(target: EngineTarget, may_retry: MayRetry) -> None:
        await _call_engine(ctx, responder, target, path=path, may_retry=may_retry)

    progress = loading_progress(ctx, responder)
    attempt = engine_attempt(ctx, call, untouched=lambda: not responder.started, progress=progress)
    await with_retries(ctx, attempt)


async def _call_engine(
    ctx: RequestContext,
    responder: Responder,
    target: EngineTarget,
    *,
    path: str,
    may_retry: MayRetry,
) -> None:
    pin_session_slot(ctx, target)
    body = engine_body(ctx)
    async with engine_response(ctx, target, path=path, body=body) as resp:
        check_answer(target, resp.status, may_retry)
        if is_event_stream(ctx, resp):
            await responder.start_stream(status=resp.status, headers=stream_headers(ctx, resp))
            async for events in stream_events(ctx, resp, stream_relay(ctx), target.engine):
                await responder.write(events)
            await ctx.finish()
            await responder.end_stream()
            return
        await whole_precheck(ctx, resp)  # classifier rules (async) before the filters
        whole = await whole_answer(ctx, resp)
        # Stored before the headers go out: if storing fails, the client gets a clean 500.
        await ctx.finish()
        if responder.stream_started:  # progress comments went out: the answer is a stream
            await responder.write(error_event(_error_payload(whole.body)))
            await responder.end_stream()
            return
        await responder.send_whole(whole)


def _error_payload(body: bytes) -> dict:
    """An engine's error answer as the payload of a stream's error event."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        payload = None
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        return payload
    message = body.decode("utf-8", "replace") or "The engine failed."
    return {"error": {"message": message, "type": "api_error", "param": None, "code": None}}


def settle(ctx: RequestContext) -> None:
    """Whatever happened: charge the quota what was used, log the request (if a tenant is
    known: 401s are not logged, see README)."""
    if tracing.tracer is not None:
        with tracing.stage_span("settle"):
            return _settle(ctx)
    return _settle(ctx)


def _settle(ctx: RequestContext) -> None:
    quota_settle(ctx)
    record_request(ctx)
    if ctx.principal is not None:
        request_log_writer.add(request_log_row(ctx))


def request_log_row(ctx: RequestContext) -> tuple:
    assert ctx.principal is not None
    cache = cache_state(ctx)
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
        safety_action=safety_action(ctx),
        cache_status=cache.status if cache is not None else "",
        cache_saved_tokens=cache.saved_tokens if cache is not None else 0,
        cost=ctx.extras.get("cost"),  # set by quota_settle (apps/quotas/stage.py)
    )
