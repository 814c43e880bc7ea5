"""The state of one /v1 request as it moves through the pipeline, and its log entry."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from django.utils import timezone

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
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usage_estimated: bool = False
    client_disconnected: bool = False
    first_token_at: float | None = None
    timings: dict[str, Any] | None = None
    usage_recorded: bool = False

    def record_usage(self, usage: dict[str, Any] | None, *, fallback_completion: int = 0) -> None:
        """Take the engine's usage, or estimate it when the engine sent none."""
        self.usage_recorded = True
        if usage and isinstance(usage.get("prompt_tokens"), int):
            self.prompt_tokens = usage["prompt_tokens"]
            self.completion_tokens = int(usage.get("completion_tokens") or 0)
            return
        self.prompt_tokens = self.prompt_estimate
        self.completion_tokens = fallback_completion
        self.usage_estimated = True

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
            self.usage_estimated,
            self.client_disconnected,
            ttft,
            (time.perf_counter() - self.started) * 1000,
        )
