"""The state of one /v1 request as it moves through the pipeline, and its log entry."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from apps.proxy.models import RequestLog
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

    def to_log(self) -> RequestLog:
        assert self.principal is not None
        ttft = None
        if self.first_token_at is not None:
            ttft = (self.first_token_at - self.started) * 1000
        return RequestLog(
            tenant_id=self.principal.tenant_id,
            api_key_id=self.principal.key_id,
            endpoint=self.endpoint,
            model=self.model,
            engine=self.engine,
            stream=self.stream,
            status_code=self.status,
            error_code=self.error_code,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            usage_estimated=self.usage_estimated,
            client_disconnected=self.client_disconnected,
            ttft_ms=ttft,
            latency_ms=(time.perf_counter() - self.started) * 1000,
        )
