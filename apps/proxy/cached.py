"""Answering from the response cache (apps/cache): the stored answer sent whole, or
replayed as a stream of chunks when the client asked for one; the quota is not reserved
for it and its tokens are not charged."""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from apps.cache.stage import CacheState, cache_state
from apps.core.context import RequestContext
from apps.proxy.engine_call import WholeAnswer
from apps.proxy.responder import Responder

Stage = Callable[[RequestContext], Awaitable[None]]

HIT_HEADER = (b"x-gateway-cache", b"hit")
NO_TOKENS = {"prompt_tokens": 0, "completion_tokens": 0}


def cached_hit(ctx: RequestContext) -> CacheState | None:
    state = cache_state(ctx)
    return state if state is not None and state.status == "hit" else None


def unless_cached(stage: Stage) -> Stage:
    """`stage`, skipped for a request the cache answers (the quota reservation)."""

    async def skipped_on_hit(ctx: RequestContext) -> None:
        if cached_hit(ctx) is None:
            await stage(ctx)

    skipped_on_hit.__name__ = stage.__name__
    return skipped_on_hit


async def send_cached(ctx: RequestContext, responder: Responder, state: CacheState) -> None:
    assert state.answer is not None
    ctx.engine = ""
    ctx.status = 200
    ctx.record_usage(NO_TOKENS)  # nothing was generated: no tokens spent
    ctx.first_token_at = time.perf_counter()
    headers = [*ctx.response_headers, (b"x-gateway-model", ctx.model.encode()), HIT_HEADER]
    if not ctx.stream:
        body = orjson.dumps(state.answer)
        headers.append((b"content-type", b"application/json"))
        await responder.send_whole(WholeAnswer(status=200, headers=headers, body=body))
        return
    headers += [
        (b"content-type", b"text/event-stream"),
        (b"cache-control", b"no-cache"),
        (b"x-accel-buffering", b"no"),
    ]
    await responder.start_stream(status=200, headers=headers)
    await responder.write(b"".join(_event(c) for c in replay_chunks(ctx, state.answer)))
    await responder.end_stream()


def _event(chunk: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def replay_chunks(ctx: RequestContext, answer: dict[str, Any]) -> list[dict[str, Any]]:
    """A whole chat.completion or text_completion as the chunks a stream of it has."""
    chat = ctx.endpoint == "chat.completions"
    base = {
        "id": answer.get("id") or f"cache-{uuid.uuid4().hex}",
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": answer.get("created") or int(time.time()),
        "model": answer.get("model") or ctx.model,
    }
    chunks = []
    for choice in answer.get("choices") or ():
        index, finish = choice.get("index", 0), choice.get("finish_reason") or "stop"
        if chat:
            chunks.append({**base, "choices": [_delta(index, choice.get("message") or {})]})
            chunks.append(
                {**base, "choices": [{"index": index, "delta": {}, "finish_reason": finish}]}
            )
        else:
            text = {"index": index, "text": choice.get("text", ""), "finish_reason": finish}
            chunks.append({**base, "choices": [text]})
    if ctx.client_wants_usage and answer.get("usage"):
        chunks.append({**base, "choices": [], "usage": answer["usage"]})
    return chunks


def _delta(index: int, message: dict[str, Any]) -> dict[str, Any]:
    delta: dict[str, Any] = {"role": "assistant", "content": message.get("content")}
    if message.get("tool_calls"):
        delta["tool_calls"] = [{**call, "index": i} for i, call in enumerate(message["tool_calls"])]
    if message.get("reasoning_content"):
        delta["reasoning_content"] = message["reasoning_content"]
    return {"index": index, "delta": delta, "finish_reason": None}
