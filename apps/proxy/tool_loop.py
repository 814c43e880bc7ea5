"""The server-side tool loop: built-in tools (apps/tools) run between model calls.

    model → tool_calls of built-in tools only → each checked (ctx.tool_checks), run in the
    sandbox (or searched), its result appended as a `tool` message → model again ...

up to TOOLS_MAX_ROUNDS model calls (the last one is offered no built-in tools, so it
answers). An answer without built-in calls — text, or calls of the client's own functions
— goes to the client as usual. Each round holds its own scheduler slot (none while a tool
runs), is reserved against the quota before it starts (429 `insufficient_quota` stops the
loop) and settled and logged when it ends. Streamed: every round's content streams as it
comes, built-in calls are held back and never sent, and while a tool runs the client gets
SSE comments (`: tool python running`), never made-up content; so does a round that waits
for a managed engine to start (`: loading model X (N s)`, as a plain streamed call gets):
the first, or a later one whose engine stopped while a tool ran.

Engine faults: each round's engine call goes through reliability.py's `with_retries` as a
plain request's does (retries on another replica with backoff, the breakers fed, the
model's fallbacks), with its own retries and retry time, while nothing of that round
reached the client. A streamed answer's earlier rounds have streamed already; a round is
retried only while it sent nothing itself, and a round's stream that breaks ends the
answer as a plain stream does. A fallback model that took over a round (one the tenant
may use) serves the later rounds too, the conversation so far as its prompt; when it
fails, the rest of the requested model's fallbacks are tried. When retries and fallbacks
are spent, the client gets the error a plain request would (an error event once the
stream has started).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any

import aiohttp
import orjson
from django.conf import settings

from apps.core.context import RequestContext, engine_body
from apps.core.errors import ApiError
from apps.engines.stage import EngineTarget, pin_session_slot
from apps.engines.tokens import heuristic_message_tokens
from apps.proxy.engine_call import (
    WholeAnswer,
    engine_response,
    is_event_stream,
    stream_events,
    stream_headers,
    stream_relay,
    whole_answer,
)
from apps.proxy.progress import loading_progress
from apps.proxy.reliability import MayRetry, check_answer, engine_attempt, with_retries
from apps.proxy.responder import Responder
from apps.quotas.stage import quota_reserve
from apps.tools.runner import ToolCaller, tool_call_run
from apps.tools.schemas import SCHEMAS
from apps.tools.stage import BuiltInTools

PROGRESS_SECONDS = 5.0
Settle = Callable[[RequestContext], None]


class BuiltInCallCatcher:
    """ChunkFilter: passes content through, holds back tool-call deltas (and what follows
    them). At the end it releases them if any call is the client's; if all are built-in
    calls it keeps them (the loop runs them), and the round's usage with them."""

    def __init__(self, names: frozenset[str]) -> None:
        self.names = names
        self.held: list[dict[str, Any]] = []
        self.calls: dict[int, dict[str, Any]] = {}
        self.usage: dict[str, Any] | None = None

    def feed(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        deltas = [c.get("delta") or {} for c in chunk.get("choices") or () if isinstance(c, dict)]
        calls = [call for d in deltas if isinstance(d, dict) for call in d.get("tool_calls") or ()]
        for call in calls:
            self._merge(call)
        if not calls and not self.held:
            return [chunk]
        self.held.append(chunk)
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        return []

    def _merge(self, call: dict[str, Any]) -> None:
        slot = self.calls.setdefault(
            int(call.get("index", 0)),
            {"id": "", "type": "function", "function": {"name": "", "arguments": ""}},
        )
        slot["id"] = call.get("id") or slot["id"]
        function = call.get("function") or {}
        slot["function"]["name"] += function.get("name") or ""
        slot["function"]["arguments"] += function.get("arguments") or ""

    def built_in_only(self) -> bool:
        return bool(self.calls) and all(
            c["function"]["name"] in self.names for c in self.calls.values()
        )

    def flush(self) -> list[dict[str, Any]]:
        if self.built_in_only():
            return []
        held, self.held = self.held, []
        return held

    def message(self) -> dict[str, Any]:
        return {"role": "assistant", "content": None, "tool_calls": list(self.calls.values())}


async def answer_with_tools(
    ctx: RequestContext, responder: Responder, *, path: str, tools: BuiltInTools, settle: Settle
) -> None:
    rounds = max(1, settings.TOOLS_MAX_ROUNDS)
    for number in range(1, rounds + 1):
        last = number == rounds
        if last:
            _offer_no_built_ins(ctx.payload, tools)
        message = await _round(ctx, responder, path=path, tools=tools, last=last)
        if message is None:
            return  # answered
        results = await _run_calls(ctx, responder, message, tools)
        await _next_round(ctx, settle, [message, *results])


async def _round(
    ctx: RequestContext, responder: Responder, *, path: str, tools: BuiltInTools, last: bool
) -> dict[str, Any] | None:
    """One model call, retried (or served by a fallback) as a plain request is while
    nothing of this round reached the client: earlier rounds' streamed content does not
    stop it, this round's does. The assistant message of built-in calls to run, or None
    once the answer went to the client (always, in the last round: whatever the model
    said)."""
    if last:
        tools = BuiltInTools(names=frozenset(), sandbox=None)
    writes = responder.writes

    async def call(target: EngineTarget, may_retry: MayRetry) -> dict[str, Any] | None:
        return await _call_round(
            ctx, responder, target, path=path, tools=tools, may_retry=may_retry
        )

    # Streamed, a round that waits for a managed engine to start (the first, or a later one
    # after the engine stopped while a tool ran) sends the same comments as a plain call.
    attempt = engine_attempt(
        ctx,
        call,
        untouched=lambda: responder.writes == writes,
        progress=loading_progress(ctx, responder),
    )
    return await with_retries(ctx, attempt)


async def _call_round(
    ctx: RequestContext,
    responder: Responder,
    target: EngineTarget,
    *,
    path: str,
    tools: BuiltInTools,
    may_retry: MayRetry,
) -> dict[str, Any] | None:
    pin_session_slot(ctx, target)
    body = engine_body(ctx)  # the built-in tools stage changed the payload
    async with engine_response(ctx, target, path=path, body=body) as resp:
        check_answer(target, resp.status, may_retry)
        if is_event_stream(ctx, resp):
            return await _streamed_round(ctx, responder, resp, target, tools)
        whole = await whole_answer(ctx, resp)
    message = _built_in_calls(whole, tools)
    if message is not None:
        return message
    if responder.stream_started:  # a later round the engine refused: the stream ends here
        raise _engine_refusal(whole)
    await ctx.finish()
    await responder.send_whole(whole)
    return None


async def _streamed_round(
    ctx: RequestContext,
    responder: Responder,
    resp: aiohttp.ClientResponse,
    target: EngineTarget,
    tools: BuiltInTools,
) -> dict[str, Any] | None:
    catcher = BuiltInCallCatcher(tools.names)
    relay = stream_relay(ctx)
    relay.filters.append(catcher)
    await responder.start_stream(status=resp.status, headers=stream_headers(ctx, resp))
    async for events in stream_events(ctx, resp, relay, target.engine):
        await responder.write(events)
    if catcher.built_in_only() and not ctx.stream_failed:
        if catcher.usage is not None:
            ctx.record_usage(catcher.usage)
        return catcher.message()
    await ctx.finish()
    await responder.end_stream()
    return None


def _built_in_calls(whole: WholeAnswer, tools: BuiltInTools) -> dict[str, Any] | None:
    if whole.status != 200:
        return None
    try:
        message = orjson.loads(whole.body)["choices"][0]["message"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    calls = message.get("tool_calls") if isinstance(message, dict) else None
    if not calls or not all(
        isinstance(c, dict) and (c.get("function") or {}).get("name") in tools.names for c in calls
    ):
        return None
    return {"role": "assistant", "content": message.get("content"), "tool_calls": calls}


def _engine_refusal(whole: WholeAnswer) -> ApiError:
    try:
        error = orjson.loads(whole.body)["error"]
        text = str(error.get("message") or error)
    except (ValueError, KeyError, TypeError, AttributeError):
        text = whole.body[:200].decode("utf-8", "replace")
    return ApiError(whole.status, f"The engine refused a tool round: {text}", type="api_error")


async def _run_calls(
    ctx: RequestContext, responder: Responder, message: dict[str, Any], tools: BuiltInTools
) -> list[dict[str, Any]]:
    assert ctx.principal is not None
    caller = ToolCaller(
        tenant_id=ctx.principal.tenant_id,
        api_key_id=ctx.principal.key_id,
        session_id=ctx.session_id or "",
    )
    results = []
    for call in message["tool_calls"]:
        function = call.get("function") or {}
        name = str(function.get("name"))
        work = tool_call_run(
            name=name,
            arguments=str(function.get("arguments") or ""),
            tools=tools,
            checks=list(ctx.tool_checks),
            caller=caller,
        )
        content = await _with_progress(ctx, responder, name, work)
        results.append({"role": "tool", "tool_call_id": call.get("id") or "", "content": content})
    return results


async def _with_progress(
    ctx: RequestContext, responder: Responder, name: str, work: Coroutine[Any, Any, str]
) -> str:
    """Await the tool; a streamed answer gets a comment now and then so clients stay. If
    the request is cancelled (client gone) the tool is cancelled too (its process killed)."""
    task = asyncio.ensure_future(work)
    try:
        if ctx.stream:
            await responder.comment(f"tool {name} running")
        while True:
            done, _ = await asyncio.wait({task}, timeout=PROGRESS_SECONDS)
            if done:
                return task.result()
            if ctx.stream:
                await responder.comment(f"tool {name} still running")
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _next_round(ctx: RequestContext, settle: Settle, added: list[dict[str, Any]]) -> None:
    """Settle and log the round that ended; append its messages; reserve the next one."""
    prompt = max(ctx.prompt_estimate, ctx.prompt_tokens) + ctx.completion_tokens
    settle(ctx)
    _reset_round(ctx)
    ctx.payload["messages"] = [*ctx.payload["messages"], *added]
    ctx.tool_exchange += added
    ctx.prompt_estimate = prompt + sum(heuristic_message_tokens(m) for m in added)
    ctx.prompt_counted = False
    ctx.response_headers = [h for h in ctx.response_headers if not h[0].startswith(b"x-ratelimit-")]
    await quota_reserve(ctx)


def _reset_round(ctx: RequestContext) -> None:
    ctx.usage, ctx.usage_recorded, ctx.usage_estimated = None, False, False
    ctx.prompt_tokens = ctx.completion_tokens = 0
    ctx.first_token_at = ctx.last_token_at = ctx.received_at = None
    ctx.timings, ctx.reply, ctx.status, ctx.error_code = None, None, 0, ""


def _offer_no_built_ins(payload: dict[str, Any], tools: BuiltInTools) -> None:
    """The last round: the built-in tools are withdrawn, so the model answers."""
    built_in = [SCHEMAS[name] for name in tools.names]
    remaining = [t for t in payload.get("tools") or () if t not in built_in]
    if remaining:
        payload["tools"] = remaining
        return
    for key in ("tools", "tool_choice", "parallel_tool_calls"):
        payload.pop(key, None)
