"""The response cache stage: exact-match answers of deterministic requests.

A request is cacheable when it is deterministic (temperature 0, or a `seed`) or the
client opts in with `X-Gateway-Cache: on`, the TTL that applies to its tenant and model is
above 0 (policies.py), and it is not part of a server-side session (whose history changes
each turn). `Cache-Control: no-cache` skips the lookup (the fresh answer is stored).

The key is the tenant, the model that serves it, the endpoint and the request as the
engine would get it, minus what does not change the answer (stream, stream_options,
user); streamed and whole requests share entries. On a hit the stage sets
`ctx.extras["cache"]` to the stored answer, which the proxy sends instead of calling the
engine (and the quota is not reserved); on a miss it captures the successful answer (a
response filter for whole ones, the relay's reply for streams) and stores it before the
response completes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import orjson

from apps.cache.policies import policies
from apps.cache.store import store
from apps.core.context import RequestContext
from apps.observability import metrics

CACHEABLE_ENDPOINTS = frozenset({"chat.completions", "completions", "embeddings"})
# Fields that change how the answer is delivered or attributed, not what it says.
IGNORED_FIELDS = frozenset({"stream", "stream_options", "user"})


@dataclass(slots=True)
class CacheState:
    """What the cache knows of one request (ctx.extras["cache"])."""

    key: str
    ttl: int
    status: str = "miss"  # hit, miss or bypass (no lookup, answer stored)
    answer: dict[str, Any] | None = None  # the stored answer, on a hit
    captured: dict[str, Any] | None = None  # the engine's answer, to store
    saved_tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def cache_state(ctx: RequestContext) -> CacheState | None:
    return ctx.extras.get("cache")


def _deterministic(ctx: RequestContext) -> bool:
    opt_in = (ctx.header(b"x-gateway-cache") or b"").lower() in (b"on", b"1", b"true")
    if opt_in or ctx.endpoint == "embeddings":
        return True
    payload = ctx.payload
    temperature = payload.get("temperature")
    return payload.get("seed") is not None or (
        isinstance(temperature, int | float) and temperature == 0
    )


def request_key(ctx: RequestContext) -> str:
    """tenant id : digest of (model, endpoint, the normalized request)."""
    assert ctx.principal is not None
    normalized = {k: v for k, v in ctx.payload.items() if k not in IGNORED_FIELDS}
    normalized["model"] = ctx.model
    blob = orjson.dumps([ctx.endpoint, normalized], option=orjson.OPT_SORT_KEYS)
    return f"{ctx.principal.tenant_id}:{hashlib.sha256(blob).hexdigest()}"


async def response_cache(ctx: RequestContext) -> None:
    """The stage (after the model, variant and request are final, before the quota)."""
    if ctx.endpoint not in CACHEABLE_ENDPOINTS or ctx.session_id or not _deterministic(ctx):
        return
    assert ctx.principal is not None
    assert ctx.route is not None
    ttl = await policies.ttl(tenant_id=ctx.principal.tenant_id, model_id=ctx.route.id)
    if ttl <= 0:
        return
    state = CacheState(key=request_key(ctx), ttl=ttl)
    ctx.extras["cache"] = state
    if b"no-cache" in (ctx.header(b"cache-control") or b"").lower():
        state.status = "bypass"
    else:
        stored = await store.get(state.key)
        metrics.child(metrics.CACHE_LOOKUPS, "hit" if stored else "miss").inc()
        if stored is not None:
            state.status, state.answer = "hit", orjson.loads(stored)
            usage = state.answer.get("usage") or {}
            state.saved_tokens = int(usage.get("total_tokens") or 0) or int(
                usage.get("prompt_tokens") or 0
            ) + int(usage.get("completion_tokens") or 0)
            return
    _capture(ctx, state)


def _capture(ctx: RequestContext, state: CacheState) -> None:
    if ctx.payload.get("stream") is True:
        if ctx.endpoint == "chat.completions":
            ctx.wants_reply = True  # the relay collects the streamed reply
    else:
        ctx.response_filters.append(CaptureWhole(state))

    async def store_answer() -> None:
        answer = state.captured or _from_stream(ctx)
        if answer is not None:
            await store.set(state.key, orjson.dumps(answer), state.ttl)

    ctx.before_finish.append(store_answer)


class CaptureWhole:
    """Response filter: keeps the final (filtered) body of a successful whole answer."""

    def __init__(self, state: CacheState) -> None:
        self.state = state

    def whole(self, ctx: RequestContext, body: Any) -> Any:
        if isinstance(body, dict):
            self.state.captured = body
        return body

    def stream(self, ctx: RequestContext) -> None:
        return None


def _from_stream(ctx: RequestContext) -> dict[str, Any] | None:
    """A streamed chat answer as the whole chat.completion it amounts to."""
    if ctx.reply is None:
        return None
    usage = ctx.usage or {
        "prompt_tokens": ctx.prompt_tokens,
        "completion_tokens": ctx.completion_tokens,
        "total_tokens": ctx.prompt_tokens + ctx.completion_tokens,
    }
    message = {"role": "assistant", **ctx.reply}
    finish = "tool_calls" if message.get("tool_calls") else "stop"
    return {
        "object": "chat.completion",
        "model": ctx.model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": usage,
    }
