"""What a finished /v1 request adds to the metrics (called from the pipeline's settle)."""

from __future__ import annotations

import time

from apps.core.context import RequestContext
from apps.core.usage import UsageCall
from apps.observability import metrics
from apps.observability.metrics import child

QUOTA_CODES = frozenset({"insufficient_quota"})
RATE_LIMIT_CODES = frozenset({"rate_limit_exceeded"})


def record_request(ctx: RequestContext) -> None:
    """Counters and histograms only: in memory (or the workers' shared files)."""
    tenant = ctx.principal.tenant_slug if ctx.principal is not None else ""
    model = ctx.model or "-"
    child(metrics.REQUESTS, ctx.endpoint, model, tenant, str(ctx.status or 0)).inc()
    child(metrics.DURATION, ctx.endpoint, model).observe(time.perf_counter() - ctx.started)
    if ctx.first_token_at is not None:
        child(metrics.TTFT, ctx.endpoint, model).observe(ctx.first_token_at - ctx.started)
    if ctx.prompt_tokens:
        child(metrics.TOKENS, model, tenant, "prompt").inc(ctx.prompt_tokens)
    if ctx.completion_tokens:
        child(metrics.TOKENS, model, tenant, "completion").inc(ctx.completion_tokens)
        _record_speed(ctx, model)
    if ctx.error_code in QUOTA_CODES:
        child(metrics.QUOTA_REFUSALS, tenant).inc()
    elif ctx.error_code in RATE_LIMIT_CODES:
        child(metrics.RATE_LIMIT_REFUSALS, tenant).inc()


def _record_speed(ctx: RequestContext, model: str) -> None:
    """Tokens per second of generation, when the first and last token times are known
    (a stream), or llama.cpp's own figure (a whole answer's timings)."""
    speed = None
    timings = ctx.timings or {}
    if isinstance(timings.get("predicted_per_second"), int | float):
        speed = float(timings["predicted_per_second"])
    elif ctx.first_token_at is not None and ctx.last_token_at is not None:
        elapsed = ctx.last_token_at - ctx.first_token_at
        if elapsed > 0 and ctx.completion_tokens > 1:
            speed = (ctx.completion_tokens - 1) / elapsed
    if speed:
        child(metrics.TOKENS_PER_SECOND, model).observe(speed)


def record_engine_call(call: UsageCall) -> None:
    """An engine call made for a tenant besides its request's own (apps/core/usage.py),
    counted like a request: its kind ("embeddings (ingestion)", "safety classifier", ...)
    as the endpoint, its tokens in the tenant's token counter."""
    tenant, model = call.payer.tenant_slug, call.model or "-"
    child(metrics.REQUESTS, call.kind, model, tenant, str(call.status or 0)).inc()
    child(metrics.DURATION, call.kind, model).observe(call.latency_ms / 1000)
    if call.prompt_tokens:
        child(metrics.TOKENS, model, tenant, "prompt").inc(call.prompt_tokens)
    if call.completion_tokens:
        child(metrics.TOKENS, model, tenant, "completion").inc(call.completion_tokens)
    if call.error_code in QUOTA_CODES:
        child(metrics.QUOTA_REFUSALS, tenant).inc()
