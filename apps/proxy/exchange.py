"""The state of one /v1 request as it moves through the pipeline, and its log entry."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from django.utils import timezone

from apps.quotas.state import ReservationTicket
from apps.tenants.auth import Principal


@dataclass(slots=True)
class Exchange:
    endpoint: str
    started: float = field(default_factory=time.perf_counter)
    principal: Principal | None = None
    model: str = ""
    engine: str = ""
    stream: bool = False
    status: int = 0
    error_code: str = ""
    prompt_estimate: int = 0
    prompt_counted: bool = False  # prompt_estimate came from the engine's tokenizer
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usage_estimated: bool = False
    client_disconnected: bool = False
    first_token_at: float | None = None
    timings: dict[str, Any] | None = None
    usage: dict[str, Any] | None = None
    usage_recorded: bool = False
    started_wall: float = field(default_factory=time.time)
    sent_at: float | None = None  # perf_counter() when the request went to the engine
    last_token_at: float | None = None
    received_at: float | None = None  # perf_counter() when a whole response arrived
    wants_reply: bool = False  # keep the assistant's reply (session history)
    reply: dict[str, Any] | None = None
    # Awaited just before the response completes (after a successful engine answer), so
    # what it writes is visible to the client's next request.
    before_finish: Callable[[], Awaitable[None]] | None = None
    response_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    quota_ticket: ReservationTicket | None = None
    # Reshapes a successful whole (non-streamed) JSON answer before the client sees it
    # (rerank normalisation, tool calls written as text); ValueError means a bad answer.
    rewrite_response: Callable[[Any], Any] | None = None

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

    def wall(self, perf: float | None) -> datetime | None:
        """A perf_counter() reading as a wall-clock datetime."""
        if perf is None:
            return None
        return datetime.fromtimestamp(self.started_wall + (perf - self.started), tz=UTC)

    async def finish(self) -> None:
        if self.before_finish is not None and 200 <= self.status < 300:
            await self.before_finish()

    def to_log_row(self) -> tuple:
        """This request as a request-log row (columns: request_log.LOG_COLUMNS)."""
        assert self.principal is not None
        ttft = None
        if self.first_token_at is not None:
            ttft = (self.first_token_at - self.started) * 1000
        return (
            timezone.now(),
            self.principal.tenant_id,
            self.principal.key_id,
            self.endpoint,
            self.model,
            self.engine,
            self.stream,
            self.status,
            self.error_code,
            self.prompt_tokens,
            self.completion_tokens,
            self.cached_tokens,
            self.usage_estimated,
            self.client_disconnected,
            ttft,
            (time.perf_counter() - self.started) * 1000,
        )
