"""Calling the engine: its answer, whole or as a stream of events, without client I/O.

`engine_response` posts the request; `whole_answer` and `stream_events` turn the response
into what the responder (responder.py), the one place that writes to the client, sends: a whole answer after the response filters saw it, or
each batch of stream events as it arrives (through the SSE relay and its chunk filters).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp
import orjson

from apps.core.context import RequestContext, StreamStop
from apps.core.errors import ApiError, engine_timeout, engine_unreachable, upstream_error_body
from apps.engines.client import engine_session, engine_url, request_timeout
from apps.engines.registry import EngineRoute
from apps.engines.stage import EngineTarget
from apps.engines.tokens import heuristic_tokens, message_text
from apps.observability import tracing
from apps.proxy.sse import SseRelay, error_event

Headers = list[tuple[bytes, bytes]]
NO_USAGE = {"prompt_tokens": 0, "completion_tokens": 0}

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Never forwarded to the engine: hop-by-hop, the tenant's key, and what aiohttp sets itself.
_REQUEST_DROP = HOP_BY_HOP | {
    b"authorization",
    b"host",
    b"content-length",
    b"expect",
    b"accept-encoding",
}
# Never relayed back: hop-by-hop, framing the gateway redoes, and what uvicorn adds itself.
_RESPONSE_DROP = HOP_BY_HOP | {b"content-length", b"content-encoding", b"date", b"server"}


def _connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    """Headers named in `Connection:` are hop-by-hop too (RFC 9110 7.6.1)."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(token.strip().lower() for token in value.split(b","))
    return tokens


def upstream_headers(client_headers: Headers, engine: EngineRoute) -> list[tuple[str, str]]:
    drop = _REQUEST_DROP | _connection_tokens(client_headers)
    headers = [
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in client_headers
        if name.lower() not in drop
    ]
    # The gateway re-frames bodies itself; compressed SSE would also defeat streaming.
    headers.append(("Accept-Encoding", "identity"))
    if engine.upstream_api_key:
        headers.append(("Authorization", f"Bearer {engine.upstream_api_key}"))
    return headers


def _client_headers(resp: aiohttp.ClientResponse, *, content_type: bytes | None = None) -> Headers:
    drop = _RESPONSE_DROP | _connection_tokens(resp.raw_headers)
    headers = [
        (name.lower(), value) for name, value in resp.raw_headers if name.lower() not in drop
    ]
    if content_type is not None:
        headers = [(n, v) for n, v in headers if n != b"content-type"]
        headers.append((b"content-type", content_type))
    return headers


@dataclass(slots=True)
class WholeAnswer:
    status: int
    headers: Headers
    body: bytes


@asynccontextmanager
async def engine_response(
    ctx: RequestContext, target: EngineTarget, *, path: str, body: bytes
) -> AsyncIterator[aiohttp.ClientResponse]:
    """POST `body` to the engine; its response while the block runs (closing it cancels the
    engine's work). Connection failures and timeouts become the gateway's OpenAI errors."""
    engine = target.engine
    ctx.sent_at = time.perf_counter()
    headers = upstream_headers(ctx.headers, engine)
    if tracing.tracer is not None:
        headers = tracing.trace_headers(headers)
    try:
        async with engine_session().post(
            engine_url(target.base_url, path),
            data=body,
            headers=headers,
            timeout=request_timeout(engine.timeout_seconds),
        ) as resp:
            yield resp
    except aiohttp.ClientConnectorError as exc:
        raise engine_unreachable(engine.name, str(exc.os_error or exc)) from None
    except aiohttp.ConnectionTimeoutError:
        raise engine_unreachable(engine.name, "connection timed out") from None
    except TimeoutError:
        raise engine_timeout(engine.name, engine.timeout_seconds) from None
    except aiohttp.ClientError as exc:
        raise engine_unreachable(engine.name, f"{type(exc).__name__}: {exc}") from None


def is_event_stream(ctx: RequestContext, resp: aiohttp.ClientResponse) -> bool:
    """The engine streams its answer (the client asked, and it worked)."""
    return ctx.stream and resp.status < 400 and resp.content_type == "text/event-stream"


async def whole_answer(ctx: RequestContext, resp: aiohttp.ClientResponse) -> WholeAnswer:
    """Read a whole answer: usage, timings and the reply into `ctx`, the response filters
    applied to a successful one."""
    raw = await resp.read()
    ctx.received_at = time.perf_counter()
    ctx.status = resp.status
    content_type = None
    parsed = None
    if resp.status >= 400:
        raw = upstream_error_body(resp.status, raw)
        content_type = b"application/json"
        ctx.error_code = f"engine_{resp.status}"
    elif ctx.response_filters:
        raw, parsed = _filtered(ctx, raw)
    else:
        # For the usage, the session reply, or (no usage) the text to estimate from.
        parsed = _json_object(raw)
    timings = parsed.get("timings") if parsed else None
    ctx.timings = timings if isinstance(timings, dict) else None
    if resp.status >= 400:
        ctx.record_usage(NO_USAGE)  # the engine refused: nothing was generated
    else:
        usage = parsed.get("usage") if parsed else None
        estimate = 0 if isinstance(usage, dict) else completion_estimate(parsed)
        ctx.record_usage(usage, fallback_completion=estimate)
    ctx.first_token_at = _first_token_from_timings(ctx.timings, ctx.received_at)
    if ctx.wants_reply and parsed:
        ctx.reply = _first_message(parsed)
    headers = _client_headers(resp, content_type=content_type) + ctx.response_headers
    return WholeAnswer(status=resp.status, headers=headers, body=raw)


def _filtered(ctx: RequestContext, raw: bytes) -> tuple[bytes, dict | None]:
    try:
        body = orjson.loads(raw)
        for response_filter in ctx.response_filters:
            body = response_filter.whole(ctx, body)
    except ValueError as exc:  # orjson.JSONDecodeError is a ValueError too
        raise ApiError(
            502,
            f"The engine sent an unusable answer: {exc}",
            type="api_error",
            code="bad_engine_response",
        ) from None
    return orjson.dumps(body), body if isinstance(body, dict) else None


def _json_object(raw: bytes) -> dict | None:
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, dict) else None


def completion_estimate(response: dict | None) -> int:
    """Completion tokens of a whole answer counted from its text with the tokens.py
    heuristic (~4 characters a token): what the engine generated when it reports no usage."""
    choices = response.get("choices") if response else None
    if not isinstance(choices, list):
        return 0
    return sum(heuristic_tokens(_choice_text(c)) for c in choices if isinstance(c, dict))


def _choice_text(choice: dict) -> str:
    """A choice's generated text: a chat message's content, reasoning and tool calls, or a
    text completion's text."""
    message = choice.get("message")
    if isinstance(message, dict):
        reasoning = message.get("reasoning_content")
        extra = [reasoning] if isinstance(reasoning, str) and reasoning else []
        return " ".join([message_text(message), *extra])
    text = choice.get("text")
    return text if isinstance(text, str) else ""


def _first_message(response: dict) -> dict | None:
    choices = response.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        message = choices[0].get("message")
        return message if isinstance(message, dict) else None
    return None


def _first_token_from_timings(timings: dict | None, received_at: float) -> float | None:
    """A whole response has no visible first token; llama.cpp's timings tell when it was."""
    if not timings or not timings.get("predicted_n"):
        return None
    per_token_ms = float(timings.get("predicted_ms") or 0) / float(timings["predicted_n"])
    generation_ms = float(timings.get("predicted_ms") or 0)
    return received_at - (generation_ms - per_token_ms) / 1000


def stream_relay(ctx: RequestContext) -> SseRelay:
    """The relay for one streamed answer, with each response filter's chunk filter."""
    filters = [f for f in (rf.stream(ctx) for rf in ctx.response_filters) if f is not None]
    return SseRelay(
        client_wants_usage=ctx.client_wants_usage,
        collect_reply=ctx.wants_reply,
        filters=filters,
    )


def stream_headers(ctx: RequestContext, resp: aiohttp.ClientResponse) -> Headers:
    headers = _client_headers(resp) + ctx.response_headers
    return [*headers, (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]


async def stream_events(
    ctx: RequestContext, resp: aiohttp.ClientResponse, relay: SseRelay, engine: EngineRoute
) -> AsyncIterator[bytes]:
    """The events to send, batch by batch as the engine sends them (never `[DONE]`, which
    the responder sends last). A stream the engine breaks, or a filter stops, ends with an
    error event; usage so far is recorded in any case (a client disconnect included)."""
    ctx.status = resp.status
    failure: ApiError | None = None
    try:
        async for data in resp.content.iter_any():
            out = relay.feed(data)
            if out:
                yield out
        out = relay.finish()
        if out:
            yield out
    except StreamStop as stop:
        failure = stop.error
        yield relay.encode(stop.final_chunks)
    except TimeoutError:
        failure = engine_timeout(engine.name, engine.timeout_seconds)
    except aiohttp.ClientError as exc:
        failure = ApiError(
            502,
            f"Engine `{engine.name}` closed the stream early ({type(exc).__name__}).",
            type="api_error",
            code="engine_stream_interrupted",
        )
    finally:
        _record_stream(ctx, relay)
    if failure is not None:
        # A filter's stop (status 200) keeps what the client got as the answer; an engine
        # failure's status marks the answer as not complete (nothing is stored).
        if failure.status != 200:
            ctx.status, ctx.stream_failed = failure.status, True
        ctx.error_code = failure.code or ""
        yield error_event(failure.payload())
    elif relay.upstream_error is not None:
        ctx.stream_failed = True
        ctx.error_code = str(relay.upstream_error.get("code") or "engine_stream_error")


def _record_stream(ctx: RequestContext, relay: SseRelay) -> None:
    ctx.first_token_at = relay.first_token_at
    ctx.last_token_at = relay.last_token_at
    ctx.timings = relay.timings
    if relay.reply is not None:
        ctx.reply = relay.reply.message()
    ctx.record_usage(relay.usage, fallback_completion=relay.generated_events())
