"""A deterministic fake of llama.cpp's `llama-server`, run as its own process.

Run:  python tests/fake_engine.py --host 127.0.0.1 --port 0 [--model NAME ...]
      [--ctx-size N] [--slots N] [--no-record]

It prints exactly one line `LISTENING <port>` on stdout once it accepts connections.
Behaviour is steered per request by the knobs in `Knobs`, read from the JSON body's
`"fake"` object or from `X-Fake-<Name>` headers (the body wins). GET /_fake/requests
shows what was received (including client disconnects); POST /_fake/reset clears it.

`FakeEngineProcess` starts and stops it from tests and benchmarks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import math
import os
import random
import re
import select
import signal
import subprocess
import sys
import time
import urllib.request
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Self

import orjson
from aiohttp import web

RECORD_LIMIT = 500
DEFAULT_CHUNKS = 5
DEFAULT_EMBEDDING_DIMS = 8
VOCAB_SIZE = 32000
SSE_DONE = b"data: [DONE]\n\n"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# --- knobs -------------------------------------------------------------------------


def _parse_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _parse_str(value: Any) -> str:
    return value if isinstance(value, str) else str(value)


@dataclasses.dataclass(slots=True)
class Knobs:
    """Per-request behaviour. Field names are the knob names."""

    delay: float = 0.0
    chunk_delay: float = 0.0
    chunks: int = DEFAULT_CHUNKS
    error_status: int | None = None
    error_text: str | None = None
    drop_after: int | None = None
    no_usage: bool = False
    # Reply with this text instead of "w0 w1 ...", cut into `chunks` pieces (a model that
    # writes e.g. `<tool_call>...</tool_call>` in its text).
    reply: str | None = None
    # Prompt tokens to report as served from the prompt cache (llama.cpp's cache_n).
    cached: int = 0
    # Report usage but no llama.cpp `timings` (as vLLM and other OpenAI servers do).
    no_timings: bool = False
    # Reply with exactly these pieces, one chunk each (split at chosen places); a header
    # carries them as a JSON array. Overrides `reply` and `chunks`.
    pieces: tuple[str, ...] | None = None
    # Ask for a call of this tool (OpenAI tool_calls, arguments `tool_args`, a JSON text)
    # until the conversation holds `tool_rounds` tool results; then reply
    # "Tool said: <the last tool result>" (the server-side tool loop's tests).
    tool_call: str | None = None
    tool_args: str = "{}"
    tool_rounds: int = 1
    # Answer `fail_status` to the chat request of this round (1 + the tool results its
    # conversation holds) `fail_times` times, then serve it: an engine that fails now and
    # then, which retrying the same request rides over (the tool loop's retry tests).
    fail_round: int | None = None
    fail_times: int = 1
    fail_status: int = 503


KNOB_PARSERS: dict[str, Callable[[Any], Any]] = {
    "delay": float,
    "chunk_delay": float,
    "chunks": int,
    "error_status": int,
    "error_text": _parse_str,
    "drop_after": int,
    "no_usage": _parse_bool,
    "reply": _parse_str,
    "cached": int,
    "no_timings": _parse_bool,
    "pieces": lambda value: tuple(
        str(piece) for piece in (orjson.loads(value) if isinstance(value, str) else value)
    ),
    "tool_call": _parse_str,
    "tool_args": _parse_str,
    "tool_rounds": int,
    "fail_round": int,
    "fail_times": int,
    "fail_status": int,
}
# Header lookups are precomputed: header parsing runs on every request of a benchmark.
KNOB_HEADERS: tuple[tuple[str, str], ...] = tuple(
    (name, "X-Fake-" + "-".join(part.capitalize() for part in name.split("_")))
    for name in KNOB_PARSERS
)
DEFAULT_KNOBS = Knobs()


class BadRequest(Exception):
    """The request cannot be served; answered as a llama.cpp-style 400."""


def read_knobs(request: web.Request, body: Any) -> Knobs:
    """Knobs from `X-Fake-*` headers, overridden by the body's `"fake"` object."""
    raw: dict[str, Any] = {}
    headers = request.headers
    for name, header in KNOB_HEADERS:
        value = headers.get(header)
        if value is not None:
            raw[name] = value
    fake = body.get("fake") if isinstance(body, dict) else None
    if isinstance(fake, dict):
        raw.update((k, v) for k, v in fake.items() if k in KNOB_PARSERS)
    if not raw:
        return DEFAULT_KNOBS
    try:
        return Knobs(**{k: KNOB_PARSERS[k](v) for k, v in raw.items() if v is not None})
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"bad fake knob: {exc}") from None


# --- request recording -----------------------------------------------------------------

BODY_KEY = "fake_body"
RECORD_KEY = "fake_record"
_MISSING = object()


def parse_body(raw: bytes) -> Any:
    """Parsed JSON, else the text (so malformed requests are still visible), else None."""
    if not raw:
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode("utf-8", "replace")


async def request_body(request: web.Request) -> Any:
    """The body as parsed by the recorder, or parsed here when recording is off."""
    body = request.get(BODY_KEY, _MISSING)
    if body is _MISSING:
        body = parse_body(await request.read())
    return body


def mark_cancelled(request: web.Request) -> None:
    record = request.get(RECORD_KEY)
    if record is not None and not record["cancelled"]:
        record["cancelled"] = True
        record["cancelled_at"] = time.time()


def count_chunk(request: web.Request, n: int = 1) -> None:
    record = request.get(RECORD_KEY)
    if record is not None:
        record["chunks_sent"] += n


class Recorder:
    """The last RECORD_LIMIT requests, oldest first."""

    def __init__(self) -> None:
        self.records: deque[dict[str, Any]] = deque(maxlen=RECORD_LIMIT)
        self._ids = itertools.count(1)

    def start(self, request: web.Request, body: Any) -> dict[str, Any]:
        record = {
            "id": next(self._ids),
            "path": request.path,
            "method": request.method,
            # raw_headers keeps the casing the client sent, which tests may check.
            "headers": {k.decode("latin-1"): v.decode("latin-1") for k, v in request.raw_headers},
            "body": body,
            "started_at": time.time(),
            "finished_at": None,
            "cancelled": False,
            "cancelled_at": None,
            "chunks_sent": 0,
        }
        self.records.append(record)
        return record

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/_fake/"):
            return await handler(request)
        body = parse_body(await request.read())
        request[BODY_KEY] = body
        record = request[RECORD_KEY] = self.start(request, body)
        try:
            response = await handler(request)
        except (asyncio.CancelledError, ConnectionResetError):
            # With handler_cancellation a client disconnect lands here at once.
            mark_cancelled(request)
            raise
        if not record["cancelled"]:
            record["finished_at"] = time.time()
        return response


# --- deterministic text helpers ----------------------------------------------------


def count_words(value: Any) -> int:
    """Whitespace words in a string, text parts of a content list, or a list of prompts."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        total = 0
        for item in value:
            if isinstance(item, int):
                total += 1  # a token id
            elif isinstance(item, dict):
                text = item.get("text")
                total += len(text.split()) if isinstance(text, str) else 0
            else:
                total += count_words(item)
        return total
    return 0


def message_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = (p.get("text") for p in content if isinstance(p, dict))
        return " ".join(p for p in parts if isinstance(p, str))
    return ""


def prompt_tokens_of(path_kind: str, body: dict[str, Any]) -> int:
    if path_kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list):
            return 1
        words = sum(count_words(m.get("content")) for m in messages if isinstance(m, dict))
        return max(1, words)
    return max(1, count_words(body.get("prompt")))


def token_id(word: str) -> int:
    digest = hashlib.blake2b(word.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % VOCAB_SIZE


WORD_PATTERN = re.compile(r"\w+")


@functools.lru_cache(maxsize=4096)
def embedding_vector(text: str, dims: int) -> list[float]:
    """A hashed bag of words, normalized: texts sharing words are near (cosine), equal texts
    equal; a text without words gets a unit vector seeded by its hash."""
    vec = [0.0] * dims
    for word in WORD_PATTERN.findall(text.lower()):
        digest = hashlib.blake2b(word.encode(), digest_size=8).digest()
        vec[int.from_bytes(digest[:4], "big") % dims] += 1.0 if digest[4] & 1 else -1.0
    if not any(vec):
        rng = random.Random(hashlib.sha256(text.encode()).digest())
        vec = [rng.gauss(0.0, 1.0) for _ in range(dims)]
    norm = math.sqrt(sum(x * x for x in vec)) or 1.0
    return [x / norm for x in vec]


# --- responses -----------------------------------------------------------------------


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def error_response(status: int, message: str | None = None) -> web.Response:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    if status == 404:
        kind = "not_found_error"
    error = {"code": status, "message": message or f"fake error {status}", "type": kind}
    return json_response({"error": error}, status=status)


def knob_error(knobs: Knobs) -> web.Response:
    status = knobs.error_status or 500
    if knobs.error_text is not None:
        return web.Response(text=knobs.error_text, status=status, content_type="text/plain")
    return error_response(status)


def sse(data: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


def usage_of(prompt_tokens: int, completion_tokens: int, cached: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": min(cached, prompt_tokens)},
    }


def timings_of(prompt_tokens: int, knobs: Knobs) -> dict[str, Any]:
    # Made-up but deterministic numbers so callers can assert on them.
    per_token_ms = knobs.chunk_delay * 1000.0 if knobs.chunk_delay > 0 else 1.0
    prompt_ms = prompt_tokens * 0.5
    predicted_ms = knobs.chunks * per_token_ms
    cached = min(knobs.cached, prompt_tokens)
    return {
        "prompt_n": prompt_tokens - cached,
        "prompt_ms": prompt_ms,
        "prompt_per_token_ms": 0.5,
        "prompt_per_second": 2000.0,
        "predicted_n": knobs.chunks,
        "predicted_ms": predicted_ms,
        "predicted_per_token_ms": per_token_ms,
        "predicted_per_second": 1000.0 / per_token_ms,
        "cache_n": cached,
    }


@dataclasses.dataclass(slots=True)
class Completion:
    """What one /v1/chat/completions or /v1/completions request asked for."""

    chat: bool
    id: str
    model: str
    created: int
    prompt_tokens: int
    knobs: Knobs
    include_usage: bool

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    @property
    def chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def piece(self, i: int) -> str:
        if self.knobs.pieces is not None:
            return self.knobs.pieces[i]
        reply = self.knobs.reply
        if reply is None:
            return f"w{i} "
        size = -(-len(reply) // max(1, self.knobs.chunks))
        return reply[i * size : (i + 1) * size]

    def full_response(self) -> dict[str, Any]:
        text = "".join(self.piece(i) for i in range(self.knobs.chunks))
        if self.chat:
            message = {"role": "assistant", "content": text}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"}
        data = self.head(self.object)
        data["choices"] = [choice]
        if not self.knobs.no_usage:
            data["usage"] = usage_of(self.prompt_tokens, self.knobs.chunks, self.knobs.cached)
            if not self.knobs.no_timings:
                data["timings"] = timings_of(self.prompt_tokens, self.knobs)
        return data

    def chunk(self, delta: dict[str, Any] | None, text: str | None, finish: str | None) -> bytes:
        if self.chat:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        data = self.head(self.chunk_object)
        data["choices"] = [choice]
        if self.include_usage:
            data["usage"] = None
        return sse(data)

    def role_chunk(self) -> bytes | None:
        return self.chunk({"role": "assistant", "content": ""}, None, None) if self.chat else None

    def content_chunk(self, i: int) -> bytes:
        piece = self.piece(i)
        return self.chunk({"content": piece}, piece, None)

    def finish_chunk(self) -> bytes:
        return self.chunk({}, "", "stop")

    def usage_chunk(self) -> bytes:
        data = self.head(self.chunk_object)
        data["choices"] = []
        data["usage"] = usage_of(self.prompt_tokens, self.knobs.chunks, self.knobs.cached)
        if not self.knobs.no_timings:
            data["timings"] = timings_of(self.prompt_tokens, self.knobs)
        return sse(data)

    def tail(self) -> bytes:
        tail = self.finish_chunk()
        if self.include_usage:
            tail += self.usage_chunk()
        return tail + SSE_DONE


# --- a Llama Guard style classifier ----------------------------------------------------

GUARD_MARK = re.compile(r"fake-unsafe:(S\d{1,2})")


def guard_verdict(body: dict[str, Any], knobs: Knobs) -> Knobs:
    """A model whose name contains `guard` answers like Llama Guard: `unsafe\nS2` when the
    conversation it is shown contains `fake-unsafe:S2` (any code), else `safe`."""
    if "guard" not in str(body.get("model") or "") or knobs.reply is not None:
        return knobs
    text = " ".join(
        message_text(m.get("content")) for m in body.get("messages") or () if isinstance(m, dict)
    ) + str(body.get("prompt") or "")
    found = GUARD_MARK.search(text)
    reply = f"unsafe\n{found.group(1)}" if found else "safe"
    return dataclasses.replace(knobs, reply=reply, chunks=1, pieces=None)


def tool_turn(knobs: Knobs, body: dict[str, Any]) -> Knobs:
    """The `tool_call` knob's turn: call the tool again, or answer with its last result."""
    messages = body.get("messages") if isinstance(body.get("messages"), list) else []
    results = [m for m in messages if isinstance(m, dict) and m.get("role") == "tool"]
    if len(results) < knobs.tool_rounds:
        return knobs
    said = message_text(results[-1].get("content"))
    return dataclasses.replace(knobs, tool_call=None, reply=f"Tool said: {said}", chunks=4)


# --- the app ---------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class Config:
    models: list[str]
    ctx_size: int = 4096
    slots: int = 4
    record: bool = True
    embedding_dims: int = DEFAULT_EMBEDDING_DIMS


class FakeEngine:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.recorder = Recorder()
        self._ids = itertools.count(1)
        self.failures: dict[str, int] = {}  # the `fail_round` knob's count, by conversation

    def app(self) -> web.Application:
        middlewares = [self.recorder.middleware] if self.config.record else []
        # Large prompts are legitimate; aiohttp's 1 MiB default would reject them.
        app = web.Application(middlewares=middlewares, client_max_size=64 * 1024 * 1024)
        routes = [
            web.post("/v1/chat/completions", self.guarded(self.chat_completions)),
            web.post("/v1/completions", self.guarded(self.completions)),
            web.post("/v1/embeddings", self.guarded(self.embeddings)),
            web.get("/v1/models", self.guarded(self.models)),
            web.get("/health", self.guarded(self.health)),
            web.post("/tokenize", self.guarded(self.tokenize)),
            web.post("/apply-template", self.guarded(self.apply_template)),
            web.get("/props", self.guarded(self.props)),
            web.post("/rerank", self.guarded(self.rerank)),
            web.post("/v1/rerank", self.guarded(self.rerank)),
            web.get("/_fake/requests", self.fake_requests),
            web.post("/_fake/reset", self.fake_reset),
            web.route("*", "/{tail:.*}", self.guarded(self.not_found)),
        ]
        app.add_routes(routes)
        return app

    def guarded(self, handler: Handler) -> Handler:
        """Apply the shared knobs (delay, error_status) before the endpoint runs."""

        async def wrapper(request: web.Request) -> web.StreamResponse:
            body = await request_body(request)
            try:
                knobs = read_knobs(request, body)
            except BadRequest as exc:
                return error_response(400, str(exc))
            if knobs.delay > 0:
                await asyncio.sleep(knobs.delay)
            if knobs.error_status is not None:
                return knob_error(knobs)
            request["fake_knobs"] = knobs
            try:
                return await handler(request)
            except BadRequest as exc:
                return error_response(400, str(exc))
            except ConnectionResetError:
                # The client left while we were writing (wrk does so at the end of every
                # run). Returning quietly avoids aiohttp logging a 500 with a traceback;
                # its own final write then fails and is ignored as a disconnect.
                mark_cancelled(request)
                return web.Response()

        return wrapper

    # --- completions -------------------------------------------------------------------

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self.complete(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self.complete(request, chat=False)

    async def complete(self, request: web.Request, chat: bool) -> web.StreamResponse:
        body = await request_body(request)
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object")
        stream_options = body.get("stream_options")
        include_usage = isinstance(stream_options, dict) and bool(
            stream_options.get("include_usage")
        )
        knobs: Knobs = request["fake_knobs"]
        if knobs.pieces is not None:
            knobs = dataclasses.replace(knobs, chunks=len(knobs.pieces))
        knobs = guard_verdict(body, knobs)
        failure = self.flaky_failure(knobs, body) if chat else None
        if failure is not None:
            return failure
        if chat and knobs.tool_call:
            knobs = tool_turn(knobs, body)
        completion = Completion(
            chat=chat,
            id=f"{'chatcmpl' if chat else 'cmpl'}-fake-{next(self._ids)}",
            model=str(body.get("model") or self.config.models[0]),
            created=int(time.time()),
            prompt_tokens=prompt_tokens_of("chat" if chat else "text", body),
            knobs=knobs,
            include_usage=include_usage and not knobs.no_usage,
        )
        overflow = self.context_overflow(completion.prompt_tokens, body)
        if overflow is not None:
            return overflow
        if knobs.tool_call:
            return await self.call_tool(request, completion, stream=bool(body.get("stream")))
        if not body.get("stream"):
            return json_response(completion.full_response())
        return await self.stream(request, completion)

    async def call_tool(
        self, request: web.Request, completion: Completion, *, stream: bool
    ) -> web.StreamResponse:
        knobs = completion.knobs
        call = {
            "id": f"call_fake_{completion.id}",
            "type": "function",
            "function": {"name": knobs.tool_call, "arguments": knobs.tool_args},
        }
        usage = usage_of(completion.prompt_tokens, knobs.chunks)
        if not stream:
            data = completion.head("chat.completion")
            message = {"role": "assistant", "content": None, "tool_calls": [call]}
            data["choices"] = [{"index": 0, "message": message, "finish_reason": "tool_calls"}]
            data["usage"] = usage
            return json_response(data)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(completion.role_chunk() or b"")
        await response.write(completion.chunk({"tool_calls": [{"index": 0, **call}]}, None, None))
        tail = completion.chunk({}, None, "tool_calls")
        if completion.include_usage:
            tail += sse({**completion.head("chat.completion.chunk"), "choices": [], "usage": usage})
        await response.write_eof(tail + SSE_DONE)
        return response

    def flaky_failure(self, knobs: Knobs, body: dict[str, Any]) -> web.Response | None:
        """The `fail_round` knob: this round's failure, while it has failed fewer than
        `fail_times` times (counted by the conversation's messages: a retry sends the same)."""
        if knobs.fail_round is None:
            return None
        messages = body.get("messages") if isinstance(body.get("messages"), list) else []
        tool_results = sum(1 for m in messages if isinstance(m, dict) and m.get("role") == "tool")
        if tool_results + 1 != knobs.fail_round:
            return None
        key = hashlib.blake2b(orjson.dumps(messages, option=orjson.OPT_SORT_KEYS)).hexdigest()
        failed = self.failures.get(key, 0)
        if failed >= knobs.fail_times:
            return None
        self.failures[key] = failed + 1
        return error_response(knobs.fail_status)

    def context_overflow(self, prompt_tokens: int, body: dict[str, Any]) -> web.Response | None:
        """llama-server refuses a prompt (plus the asked-for answer) its context cannot hold."""
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or 0
        needed = prompt_tokens + (max_tokens if isinstance(max_tokens, int) else 0)
        if needed <= self.config.ctx_size:
            return None
        error = {
            "code": 400,
            "message": "the request exceeds the available context size, try increasing it",
            "type": "exceed_context_size_error",
            "n_prompt_tokens": prompt_tokens,
            "n_ctx": self.config.ctx_size,
        }
        return json_response({"error": error}, status=400)

    async def stream(self, request: web.Request, completion: Completion) -> web.StreamResponse:
        knobs = completion.knobs
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        head = completion.role_chunk() or b""
        n = knobs.chunks if knobs.drop_after is None else min(knobs.chunks, knobs.drop_after)
        if head:
            await response.write(head)
        for i in range(n):
            # One write per chunk even when instant, as a real engine emits one per token.
            if knobs.chunk_delay > 0:
                await asyncio.sleep(knobs.chunk_delay)
            await response.write(completion.content_chunk(i))
            count_chunk(request)
        if knobs.drop_after is not None and knobs.drop_after < knobs.chunks:
            return self.drop(request, response)
        await response.write_eof(completion.tail())
        return response

    @staticmethod
    def drop(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
        """Cut the connection mid-body, as a crashing engine would."""
        record = request.get(RECORD_KEY)
        if record is not None:
            record["dropped"] = True
        transport = request.transport
        if transport is not None:
            # close() (not abort()) so chunks already queued still reach the client
            # before the FIN; the chunked body is never terminated either way.
            transport.close()
        # aiohttp's write_eof now fails with ConnectionError, which it swallows.
        return response

    # --- other llama.cpp endpoints ---------------------------------------------------

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        body = await request_body(request)
        if not isinstance(body, dict) or "input" not in body:
            raise BadRequest("'input' is required")
        dims = int(body.get("dimensions") or self.config.embedding_dims)
        inputs = embedding_inputs(body["input"])
        data = [
            {"object": "embedding", "index": i, "embedding": embedding_vector(text, dims)}
            for i, text in enumerate(inputs)
        ]
        tokens = sum(max(1, len(text.split())) for text in inputs)
        return json_response(
            {
                "object": "list",
                "data": data,
                "model": str(body.get("model") or self.config.models[0]),
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    async def models(self, request: web.Request) -> web.StreamResponse:
        created = int(time.time())
        data = [
            {"id": name, "object": "model", "created": created, "owned_by": "llamacpp"}
            for name in self.config.models
        ]
        return json_response({"object": "list", "data": data})

    async def health(self, request: web.Request) -> web.StreamResponse:
        return json_response({"status": "ok"})

    async def tokenize(self, request: web.Request) -> web.StreamResponse:
        body = await request_body(request)
        if isinstance(body, dict) and ("prompt" in body or "messages" in body):
            return self.vllm_tokenize(body)
        content = body.get("content") if isinstance(body, dict) else None
        words = content.split() if isinstance(content, str) else []
        # Never a BOS token: callers count prompt tokens with this.
        if isinstance(body, dict) and body.get("with_pieces"):
            tokens: list[Any] = [{"id": token_id(w), "piece": w} for w in words]
        else:
            tokens = [token_id(w) for w in words]
        return json_response({"tokens": tokens})

    def vllm_tokenize(self, body: dict[str, Any]) -> web.Response:
        """vLLM's /tokenize: a prompt, or chat messages rendered with the template (the
        fake's "<|role|>" markers count as words); the count includes a BOS token unless
        add_special_tokens is false."""
        if "messages" in body:
            text = " ".join(
                f"<|{m.get('role', 'user')}|> {message_text(m.get('content'))}"
                for m in body["messages"]
                if isinstance(m, dict)
            ) + (" <|assistant|>" if body.get("add_generation_prompt", True) else "")
        else:
            text = body["prompt"] if isinstance(body["prompt"], str) else ""
        tokens = [token_id(w) for w in text.split()]
        if body.get("add_special_tokens", True):
            tokens.insert(0, 1)
        return json_response(
            {"count": len(tokens), "max_model_len": self.config.ctx_size, "tokens": tokens}
        )

    async def apply_template(self, request: web.Request) -> web.StreamResponse:
        body = await request_body(request)
        messages = body.get("messages") if isinstance(body, dict) else None
        if not isinstance(messages, list):
            raise BadRequest("'messages' is required")
        parts = [
            f"<|{m.get('role', 'user')}|>\n{message_text(m.get('content'))}\n"
            for m in messages
            if isinstance(m, dict)
        ]
        return json_response({"prompt": "".join(parts) + "<|assistant|>\n"})

    async def props(self, request: web.Request) -> web.StreamResponse:
        return json_response(
            {
                "default_generation_settings": {"n_ctx": self.config.ctx_size},
                "total_slots": self.config.slots,
                "model_path": f"/models/{self.config.models[0]}.gguf",
            }
        )

    async def rerank(self, request: web.Request) -> web.StreamResponse:
        body = await request_body(request)
        if not isinstance(body, dict) or not isinstance(body.get("documents"), list):
            raise BadRequest("'query' and 'documents' are required")
        query = str(body.get("query") or "")
        docs = [d.get("text", "") if isinstance(d, dict) else str(d) for d in body["documents"]]
        results = [
            {"index": i, "relevance_score": rerank_score(query, doc)} for i, doc in enumerate(docs)
        ]
        # sorted() is stable, so ties keep document order: deterministic.
        results.sort(key=lambda r: -r["relevance_score"])
        top_n = body.get("top_n")
        if isinstance(top_n, int) and top_n >= 0:
            results = results[:top_n]
        tokens = max(1, len(query.split())) + sum(len(d.split()) for d in docs)
        return json_response(
            {
                "model": str(body.get("model") or self.config.models[0]),
                "object": "list",
                "results": results,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    async def not_found(self, request: web.Request) -> web.StreamResponse:
        return error_response(404, "File Not Found")

    # --- inspection ------------------------------------------------------------------

    async def fake_requests(self, request: web.Request) -> web.StreamResponse:
        return json_response(list(self.recorder.records))

    async def fake_reset(self, request: web.Request) -> web.StreamResponse:
        self.recorder.records.clear()
        self.failures.clear()
        return json_response({"status": "ok"})


def embedding_inputs(value: Any) -> list[str]:
    """Each input as text; token-id lists become their ids joined by spaces."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        if value and all(isinstance(v, int) for v in value):
            return [" ".join(map(str, value))]
        return [" ".join(map(str, v)) if isinstance(v, list) else str(v) for v in value]
    raise BadRequest("'input' must be a string or a list")


def rerank_score(query: str, document: str) -> float:
    words = query.lower().split()
    if not words:
        return 0.0
    doc_words = set(document.lower().split())
    return sum(1 for w in words if w in doc_words) / len(words)


# --- process entry point ---------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Fake llama.cpp llama-server for tests.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--model", action="append", dest="models", help="may repeat")
    parser.add_argument("--ctx-size", type=int, default=4096)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--no-record", action="store_true", help="skip request recording")
    parser.add_argument("--embedding-dims", type=int, default=DEFAULT_EMBEDDING_DIMS)
    parser.add_argument(
        "--startup-delay", type=float, default=0.0, help="seconds before it listens (loading)"
    )
    parser.add_argument(
        "--ignore-sigterm", action="store_true", help="keep running on SIGTERM (a hung engine)"
    )
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    config = Config(
        models=args.models or ["fake-model"],
        ctx_size=args.ctx_size,
        slots=args.slots,
        record=not args.no_record,
        embedding_dims=args.embedding_dims,
    )
    # handler_cancellation: a client disconnect must cancel the handler at once, as it
    # does in llama-server, so cancellation tests observe it. No access log: speed.
    runner = web.AppRunner(
        FakeEngine(config).app(), handler_cancellation=True, access_log=None, shutdown_timeout=1
    )
    await runner.setup()
    await asyncio.sleep(args.startup_delay)  # a model that takes a while to load
    site = web.TCPSite(runner, args.host, args.port, backlog=2048)
    await site.start()
    port = runner.addresses[0][1]
    print(f"LISTENING {port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        if sig == signal.SIGTERM and args.ignore_sigterm:
            signal.signal(sig, signal.SIG_IGN)
            continue
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        import uvloop

        uvloop.run(serve(args))
    except ImportError:
        asyncio.run(serve(args))


# --- helper for tests and benchmarks -------------------------------------------------


class FakeEngineProcess:
    """Runs the fake engine as a subprocess: `with FakeEngineProcess().start() as e: e.url`."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.port: int | None = None
        self.host = "127.0.0.1"

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("fake engine not started")
        return f"http://{self.host}:{self.port}"

    def start(self, *args: str, timeout: float = 10.0) -> Self:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--host", self.host, "--port", "0"]
        self.proc = subprocess.Popen([*cmd, *args], stdout=subprocess.PIPE)
        try:
            self.port = self._read_port(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _read_port(self, timeout: float) -> int:
        """Wait for the `LISTENING <port>` line without blocking past the timeout."""
        assert self.proc is not None
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        buffer = b""
        while b"\n" not in buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"fake engine did not print LISTENING within {timeout}s")
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                data = os.read(fd, 4096)
                if not data:
                    code = self.proc.poll()
                    raise RuntimeError(f"fake engine exited before listening (code {code})")
                buffer += data
        line = buffer.split(b"\n", 1)[0].decode().strip()
        keyword, _, port = line.partition(" ")
        if keyword != "LISTENING" or not port.isdigit():
            raise RuntimeError(f"unexpected first line from fake engine: {line!r}")
        return int(port)

    def _call(self, method: str, path: str) -> Any:
        request = urllib.request.Request(
            self.url + path, method=method, data=b"" if method == "POST" else None
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def requests(self) -> list[dict[str, Any]]:
        return self._call("GET", "/_fake/requests")

    def reset(self) -> None:
        self._call("POST", "/_fake/reset")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if proc.stdout is not None:
            with contextlib.suppress(OSError):
                proc.stdout.close()

    def __enter__(self) -> Self:
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __del__(self) -> None:
        # Last resort so an aborted test run does not leak engine processes.
        with contextlib.suppress(Exception):
            self.stop()


if __name__ == "__main__":
    main()
