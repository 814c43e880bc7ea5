"""OpenTelemetry traces of /v1 requests: one span per request, a child per pipeline stage,
and the W3C `traceparent` of the engine call sent to the engine.

Off unless OTEL_EXPORTER_OTLP_ENDPOINT is set (then spans go there over OTLP/HTTP, in
batches, with OTEL_SERVICE_NAME, default `llm-gateway`); `configure()` also takes any
span processor (tests pass an in-memory exporter). While off, `tracer` is None and the
pipeline runs its plain loop: no span objects, no context, nothing per request.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

Headers = list[tuple[bytes, bytes]]
TRACE_HEADERS = frozenset({"traceparent", "tracestate"})

tracer: trace.Tracer | None = None
_provider: TracerProvider | None = None


def configure(processor: SpanProcessor | None = None) -> None:
    """Turn tracing on with `processor`, else with the OTLP exporter when
    OTEL_EXPORTER_OTLP_ENDPOINT is set; otherwise leave it off."""
    global tracer, _provider
    if processor is None:
        if not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
            return
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        processor = BatchSpanProcessor(OTLPSpanExporter())
    name = os.environ.get("OTEL_SERVICE_NAME", "llm-gateway")
    _provider = TracerProvider(resource=Resource.create({"service.name": name}))
    _provider.add_span_processor(processor)
    tracer = _provider.get_tracer("apps.proxy.pipeline")


def shutdown() -> None:
    """Flush what is batched, then stop tracing."""
    global tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    tracer, _provider = None, None


class _HeaderGetter:
    def get(self, carrier: Headers, key: str) -> list[str] | None:
        wanted = key.encode()
        values = [v.decode("latin-1") for k, v in carrier if k == wanted]
        return values or None

    def keys(self, carrier: Headers) -> list[str]:
        return [k.decode("latin-1") for k, _ in carrier]


@contextmanager
def request_span(endpoint: str, headers: Headers) -> Iterator[Span]:
    """The request's span, continuing the client's trace if it sent a `traceparent`."""
    assert tracer is not None
    parent = propagate.extract(headers, getter=_HeaderGetter())
    token = otel_context.attach(parent)
    try:
        # Refusals (4xx) are answers, not span errors: finish_request sets the status.
        with tracer.start_as_current_span(
            f"POST {endpoint}",
            kind=SpanKind.SERVER,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            span.set_attribute("gateway.endpoint", endpoint)
            yield span
    finally:
        otel_context.detach(token)


@contextmanager
def stage_span(name: str) -> Iterator[Span]:
    assert tracer is not None
    with tracer.start_as_current_span(name) as span:
        yield span


def finish_request(span: Span, ctx: Any) -> None:
    """What the request span says once the request is settled."""
    span.set_attribute("http.response.status_code", ctx.status or 0)
    span.set_attribute("gateway.model", ctx.model)
    span.set_attribute("gateway.engine", ctx.engine)
    if ctx.principal is not None:
        span.set_attribute("gateway.tenant", ctx.principal.tenant_slug)
    span.set_attribute("gen_ai.usage.input_tokens", ctx.prompt_tokens)
    span.set_attribute("gen_ai.usage.output_tokens", ctx.completion_tokens)
    if ctx.status >= 500:
        span.set_status(Status(StatusCode.ERROR, ctx.error_code))


def trace_headers(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The engine request's headers with the current span's `traceparent` (the client's
    own trace headers replaced)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    kept = [(k, v) for k, v in headers if k.lower() not in TRACE_HEADERS]
    return kept + list(carrier.items())
