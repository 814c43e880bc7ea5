"""OpenTelemetry: a span per /v1 request, a child per pipeline stage, the trace sent to the
engine as `traceparent`, checked with an in-memory exporter on the consumer in process."""

from __future__ import annotations

from collections.abc import Iterator

import orjson
import pytest
from channels.testing import HttpCommunicator
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from apps.engines.client import close_engine_session
from apps.observability import tracing
from apps.proxy.consumers import ChatCompletionsConsumer
from apps.request_logs.writer import request_log_writer
from tests.conftest import FAKE_MODEL

pytestmark = pytest.mark.django_db(transaction=True)

CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_PARENT = f"00-{CLIENT_TRACE}-b7ad6b7169203331-01"


@pytest.fixture
def spans(settings) -> Iterator[InMemorySpanExporter]:
    settings.REGISTRY_CACHE_SECONDS = 0
    settings.AUTH_CACHE_SECONDS = 0
    exporter = InMemorySpanExporter()
    tracing.configure(SimpleSpanProcessor(exporter))
    yield exporter
    tracing.shutdown()


@pytest.fixture(autouse=True)
async def _own_loop_clients() -> None:
    """The engine client and the log writer belong to one event loop: each test has its own."""
    yield
    await request_log_writer.flush()
    await close_engine_session()


async def post_chat(key, *, headers: list | None = None, **body) -> dict:
    payload = {"model": FAKE_MODEL, "messages": [{"role": "user", "content": "hi"}], **body}
    communicator = HttpCommunicator(
        ChatCompletionsConsumer.as_asgi(),
        "POST",
        "/v1/chat/completions",
        body=orjson.dumps(payload),
        headers=[(b"authorization", key.auth["Authorization"].encode()), *(headers or [])],
    )
    return await communicator.get_response(timeout=10)


async def test_it_traces_each_stage_of_a_request_and_forwards_the_trace(
    spans, alice, engine, fake_engine
):
    response = await post_chat(alice, headers=[(b"traceparent", CLIENT_PARENT.encode())])
    assert response["status"] == 200
    finished = {span.name: span for span in spans.get_finished_spans()}
    root = finished["POST chat.completions"]
    assert root.context.trace_id == int(CLIENT_TRACE, 16)  # continues the client's trace
    assert root.attributes["gateway.tenant"] == "alice"
    assert root.attributes["http.response.status_code"] == 200
    stages = [
        "authenticate", "admit", "validate_chat", "resolve_model", "input_limits",
        "session_open", "choose_variant_by_size", "quota_reserve", "engine_call", "settle",
    ]  # fmt: skip
    for name in stages:
        assert finished[name].parent.span_id == root.context.span_id, name
    # The engine got the engine call's span as its parent, in the same trace.
    (call,) = [r for r in fake_engine.requests() if r["path"] == "/v1/chat/completions"]
    traceparent = {k.lower(): v for k, v in call["headers"].items()}["traceparent"]
    _, trace_id, parent_id, _ = traceparent.split("-")
    assert int(trace_id, 16) == root.context.trace_id
    assert int(parent_id, 16) == finished["engine_call"].context.span_id


async def test_a_refused_request_is_traced_up_to_its_refusal(spans, alice, engine):
    response = await post_chat(alice, n=99)
    assert response["status"] == 400
    names = [span.name for span in spans.get_finished_spans()]
    assert "input_limits" in names
    assert "settle" in names
    assert "engine_call" not in names


async def test_nothing_is_traced_when_tracing_is_off(alice, engine, fake_engine):
    assert tracing.tracer is None
    assert (await post_chat(alice))["status"] == 200
    (call,) = [r for r in fake_engine.requests() if r["path"] == "/v1/chat/completions"]
    assert "traceparent" not in {k.lower() for k in call["headers"]}


def test_it_exports_over_otlp_only_when_an_endpoint_is_set(monkeypatch):
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    tracing.configure()
    assert tracing.tracer is None
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    tracing.configure()
    try:
        assert tracing.tracer is not None
        (processor,) = tracing._provider._active_span_processor._span_processors
        assert type(processor.span_exporter).__name__ == "OTLPSpanExporter"
    finally:
        tracing.shutdown()
