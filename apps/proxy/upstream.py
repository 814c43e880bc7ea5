"""Calling the engine and relaying its answer, streamed or whole, to the client."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol

import aiohttp
import orjson

from apps.core.errors import ApiError, engine_timeout, engine_unreachable, upstream_error_body
from apps.engines.client import engine_session, engine_url, request_timeout
from apps.engines.registry import EngineRoute
from apps.engines.tokens import heuristic_tokens, message_text
from apps.proxy.exchange import Exchange
from apps.proxy.sse import DONE_EVENT, SseRelay, error_event

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


class Responder(Protocol):
    send_headers: Callable[..., Awaitable[None]]
    send_body: Callable[..., Awaitable[None]]


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


async def forward(
    responder: Responder,
    ex: Exchange,
    *,
    engine: EngineRoute,
    base_url: str,
    path: str,
    body: bytes,
    client_headers: Headers,
    relay: SseRelay | None,
) -> None:
    """POST `body` to the engine and relay the answer; ApiError if nothing was relayed."""
    ex.sent_at = time.perf_counter()
    try:
        async with engine_session().post(
            engine_url(base_url, path),
            data=body,
            headers=upstream_headers(client_headers, engine),
            timeout=request_timeout(engine.timeout_seconds),
        ) as resp:
            if relay is not None and resp.status < 400 and _is_event_stream(resp):
                await _relay_stream(responder, ex, resp, relay, engine)
            else:
                await _relay_whole(responder, ex, resp)
    except aiohttp.ClientConnectorError as exc:
        raise engine_unreachable(engine.name, str(exc.os_error or exc)) from None
    except aiohttp.ConnectionTimeoutError:
        raise engine_unreachable(engine.name, "connection timed out") from None
    except TimeoutError:
        raise engine_timeout(engine.name, engine.timeout_seconds) from None
    except aiohttp.ClientError as exc:
        raise engine_unreachable(engine.name, f"{type(exc).__name__}: {exc}") from None


def _is_event_stream(resp: aiohttp.ClientResponse) -> bool:
    return resp.content_type == "text/event-stream"


async def _relay_whole(responder: Responder, ex: Exchange, resp: aiohttp.ClientResponse) -> None:
    raw = await resp.read()
    ex.received_at = time.perf_counter()
    ex.status = resp.status
    content_type = None
    parsed = None
    if resp.status >= 400:
        raw = upstream_error_body(resp.status, raw)
        content_type = b"application/json"
        ex.error_code = f"engine_{resp.status}"
    elif ex.rewrite_response is not None:
        raw, parsed = _rewritten(ex, raw)
    else:
        # For the usage, the session reply, or (no usage) the text to estimate from.
        parsed = _json_object(raw)
    timings = parsed.get("timings") if parsed else None
    ex.timings = timings if isinstance(timings, dict) else None
    if resp.status >= 400:
        ex.record_usage(NO_USAGE)  # the engine refused: nothing was generated
    else:
        usage = parsed.get("usage") if parsed else None
        estimate = 0 if isinstance(usage, dict) else completion_estimate(parsed)
        ex.record_usage(usage, fallback_completion=estimate)
    ex.first_token_at = _first_token_from_timings(ex.timings, ex.received_at)
    if ex.wants_reply and parsed:
        ex.reply = _first_message(parsed)
    # Stored before the headers go out: if storing fails, the client gets a clean 500.
    await ex.finish()
    headers = _client_headers(resp, content_type=content_type) + ex.response_headers
    await responder.send_headers(status=resp.status, headers=headers)
    await responder.send_body(raw)


def _rewritten(ex: Exchange, raw: bytes) -> tuple[bytes, dict | None]:
    assert ex.rewrite_response is not None
    try:
        body = ex.rewrite_response(orjson.loads(raw))
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


async def _relay_stream(
    responder: Responder,
    ex: Exchange,
    resp: aiohttp.ClientResponse,
    relay: SseRelay,
    engine: EngineRoute,
) -> None:
    ex.status = resp.status
    headers = _client_headers(resp) + ex.response_headers
    headers += [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
    await responder.send_headers(status=resp.status, headers=headers)
    failure: ApiError | None = None
    try:
        async for data in resp.content.iter_any():
            out = relay.feed(data)
            if out:
                await responder.send_body(out, more_body=True)
        out = relay.finish()
        if out:
            await responder.send_body(out, more_body=True)
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
        # Runs on a client disconnect (cancellation) too: usage so far is still recorded.
        ex.first_token_at = relay.first_token_at
        ex.last_token_at = relay.last_token_at
        ex.timings = relay.timings
        if relay.reply is not None:
            ex.reply = relay.reply.message()
        ex.record_usage(relay.usage, fallback_completion=relay.generated_events())
    if failure is not None:
        ex.status, ex.error_code = failure.status, failure.code or ""
        await responder.send_body(error_event(failure.payload()), more_body=True)
    elif relay.upstream_error is not None:
        ex.error_code = str(relay.upstream_error.get("code") or "engine_stream_error")
    else:
        await ex.finish()
    await responder.send_body(DONE_EVENT)
