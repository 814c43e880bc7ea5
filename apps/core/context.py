"""The state of one /v1 request as it moves through the pipeline, and the hooks on its answer.

Stages (apps/proxy/pipeline.py lists them in order) are `async def stage(ctx) -> None`
functions owned by their apps; each reads and writes this context and raises ApiError to
refuse. Output hooks compose: every stage that wants to see or change the answer appends
a ResponseFilter to `ctx.response_filters`, and they run in that order.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from apps.core.errors import ApiError

if TYPE_CHECKING:  # types only: the kernel imports no app at run time
    from apps.engines.registry import ModelRoute, VariantRoute
    from apps.tenants.auth import Principal

Headers = list[tuple[bytes, bytes]]
# Checks a tool command before it runs: (tool name, command text) -> None, or raise
# ApiError to refuse it. The safety stage adds them; the tool loop calls them (the two apps
# never import each other).
ToolCheck = Callable[[str, str], Awaitable[None]]


class StreamStop(Exception):
    """Raised by a ChunkFilter to end a stream now (e.g. a safety block): the relay sends
    `final_chunks`, then `error` as an OpenAI-shaped error event and `data: [DONE]`, and
    closes the engine request."""

    def __init__(self, error: ApiError, final_chunks: list[dict[str, Any]]) -> None:
        super().__init__(error.message)
        self.error = error
        self.final_chunks = final_chunks


class ChunkFilter(Protocol):
    """One streamed answer's parsed `chat.completion.chunk`s in, the chunks to send out.

    It may hold chunks back (return fewer) and release them later; `flush` runs when the
    engine's stream ends, before `data: [DONE]`. Whenever a stream has filters, the relay
    re-encodes what they return (so a filter may rewrite a chunk's content in place)."""

    def feed(self, chunk: dict[str, Any]) -> list[dict[str, Any]]: ...

    def flush(self) -> list[dict[str, Any]]: ...


class ResponseFilter(Protocol):
    """A stage's hook on the answer: `whole` sees (and may rewrite) a successful
    non-streamed JSON body, ValueError meaning the engine's answer is unusable (502);
    `stream` gives the ChunkFilter for one streamed answer, or None to stay out of it."""

    def whole(self, ctx: RequestContext, body: Any) -> Any: ...

    def stream(self, ctx: RequestContext) -> ChunkFilter | None: ...


# "developer" is OpenAI's newer name for the system role.
SYSTEM_ROLES = frozenset({"system", "developer"})


@dataclass(frozen=True, slots=True)
class SessionHistory:
    """A session's stored messages sent along with the request, kept as the JSON text the
    database returned: never parsed nor re-serialized on the way to the engine (it grows
    with every turn), but spliced into its body by `engine_body`. Stages that read
    `payload["messages"]` see the request without it; `messages_with_history` gives the
    whole conversation, parsed, to the few that need it."""

    json: bytes = b""  # the messages' JSON objects joined by commas, without brackets
    messages: int = 0
    tokens: int = 0  # as stored (the engine's counts), estimated where none was stored
    media: bool = False  # some message has non-text parts: its bytes do not bound its tokens


NO_HISTORY = SessionHistory()


@dataclass(slots=True)
class RequestContext:
    endpoint: str
    headers: Headers = field(default_factory=list)  # the client's request headers
    body: bytes = b""  # the client's request body, forwarded as is unless payload_changed
    started: float = field(default_factory=time.perf_counter)
    started_wall: float = field(default_factory=time.time)
    # Who and what (authenticate, validate, resolve_model, size_and_choose)
    principal: Principal | None = None
    payload: dict[str, Any] = field(default_factory=dict)
    payload_changed: bool = False
    route: ModelRoute | None = None
    variant: VariantRoute | None = None
    model: str = ""
    engine: str = ""
    stream: bool = False
    client_wants_usage: bool = False  # the client asked for the usage chunk of a stream
    session_id: str | None = None
    # The session's stored history (sessions), sent after the leading system messages of
    # `payload["messages"]`; its tokens are what the engine may have cached.
    history: SessionHistory = NO_HISTORY
    # Prompt tokens a stage adds after the session history is trimmed (RAG sources): the
    # trimming keeps room for them.
    added_prompt_tokens: int = 0
    # Tokens
    prompt_estimate: int = 0
    prompt_counted: bool = False  # prompt_estimate came from the engine's tokenizer
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usage_estimated: bool = False
    usage: dict[str, Any] | None = None
    usage_recorded: bool = False
    quota_ticket: Any = None  # apps.quotas ReservationTicket, settled after the answer
    # How it went
    status: int = 0
    error_code: str = ""
    client_disconnected: bool = False
    stream_failed: bool = False  # the engine broke its stream or sent an error event
    sent_at: float | None = None  # perf_counter() when the request went to the engine
    first_token_at: float | None = None
    last_token_at: float | None = None
    received_at: float | None = None  # perf_counter() when a whole response arrived
    timings: dict[str, Any] | None = None
    wants_reply: bool = False  # keep the assistant's reply (session history)
    reply: dict[str, Any] | None = None
    # Hooks
    response_filters: list[ResponseFilter] = field(default_factory=list)
    # Awaited after a successful engine answer, before the response completes, so what
    # they write is visible to the client's next request (session turns).
    before_finish: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    response_headers: Headers = field(default_factory=list)
    # Awaited when a later stage refuses the request on content grounds (a safety block,
    # code `content_filter`), so what the session stores is the refusal (sessions).
    on_refusal: list[Callable[[ApiError], Awaitable[None]]] = field(default_factory=list)
    tool_checks: list[ToolCheck] = field(default_factory=list)
    # Messages the gateway's tool loop added to this turn (the model's built-in tool calls
    # and their results), stored in the session between the client's messages and the reply.
    tool_exchange: list[dict[str, Any]] = field(default_factory=list)
    # Whatever a stage keeps for its own later steps, keyed by the stage's app name.
    extras: dict[str, Any] = field(default_factory=dict)

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def record_usage(self, usage: dict[str, Any] | None, *, fallback_completion: int = 0) -> None:
        """Take the engine's usage, or estimate it when the engine sent none."""
        self.usage_recorded = True
        self.usage = usage if isinstance(usage, dict) else None
        if usage and isinstance(usage.get("prompt_tokens"), int):
            self.prompt_tokens = usage["prompt_tokens"]
            self.completion_tokens = int(usage.get("completion_tokens") or 0)
            return
        self.prompt_tokens = self.prompt_estimate
        self.completion_tokens = fallback_completion
        self.usage_estimated = True

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens served from the engine's cache: OpenAI's cached_tokens, else
        llama.cpp's timings.cache_n."""
        details = (self.usage or {}).get("prompt_tokens_details") or {}
        cached = details.get("cached_tokens")
        if cached is None:
            cached = (self.timings or {}).get("cache_n")
        return int(cached or 0)

    @property
    def spent_tokens(self) -> int:
        """What the engine worked on, for settling the quota (0 if it never did)."""
        return self.prompt_tokens + self.completion_tokens if self.usage_recorded else 0

    def wall(self, perf: float | None) -> datetime | None:
        """A perf_counter() reading as a wall-clock datetime."""
        if perf is None:
            return None
        return datetime.fromtimestamp(self.started_wall + (perf - self.started), tz=UTC)

    async def refused(self, err: ApiError) -> None:
        """Run the on_refusal hooks if `err` refuses the request's content."""
        if err.code == "content_filter":
            for hook in self.on_refusal:
                await hook(err)

    async def finish(self) -> None:
        """Run the before_finish hooks if the engine answered in full."""
        if 200 <= self.status < 300 and not self.stream_failed:
            for hook in self.before_finish:
                await hook()

    def release(self) -> None:
        """Drop the stages' hooks once the request is settled. Each holds this context (a
        closure, a partial, a filter's reference), so every request would otherwise leave
        a reference cycle that only the collector frees: measured in bench/run.py (c),
        ~17 objects of cyclic garbage per request and most of the full collections'
        pauses. Without the hooks the context is freed as soon as the last reference goes."""
        self.before_finish.clear()
        self.on_refusal.clear()
        self.response_filters.clear()
        self.tool_checks.clear()


def _history_at(messages: Sequence[Any]) -> int:
    """Where the stored history goes among the request's messages: after the leading
    system (and developer) messages, which chat templates (llama.cpp's among them) want
    first, before the rest."""
    index = 0
    while index < len(messages):
        message = messages[index]
        if not isinstance(message, dict) or message.get("role") not in SYSTEM_ROLES:
            break
        index += 1
    return index


def messages_with_history(messages: list[Any], history: SessionHistory) -> list[Any]:
    """The whole conversation the engine gets, parsed: for the rare paths that must see
    every message (a safety classifier, the engine's own token count)."""
    if not history.messages:
        return messages
    at = _history_at(messages)
    return [*messages[:at], *orjson.loads(b"[" + history.json + b"]"), *messages[at:]]


def engine_body(ctx: RequestContext) -> bytes:
    """The request body for the engine: the client's as is if no stage changed it, else the
    payload serialized, a session's history spliced into its messages as stored."""
    if ctx.history.messages:
        messages = ctx.payload["messages"]
        at = _history_at(messages)
        pieces = (
            orjson.dumps(messages[:at])[1:-1],
            ctx.history.json,
            orjson.dumps(messages[at:])[1:-1],
        )
        spliced = orjson.Fragment(b"[" + b",".join(p for p in pieces if p) + b"]")
        return orjson.dumps({**ctx.payload, "messages": spliced})
    return orjson.dumps(ctx.payload) if ctx.payload_changed else ctx.body
