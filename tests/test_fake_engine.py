"""The fake llama-server behaves as the gateway's tests and the benchmark rely on."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.fake_engine import FakeEngineProcess

CHAT_BODY: dict[str, Any] = {
    "model": "m1",
    "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hello there friend"}]},
    ],
}


@pytest.fixture(scope="module")
def engine() -> Iterator[FakeEngineProcess]:
    with FakeEngineProcess().start("--model", "m1", "--model", "m2") as proc:
        yield proc


@pytest.fixture
def client(engine: FakeEngineProcess) -> Iterator[httpx.Client]:
    engine.reset()
    with httpx.Client(base_url=engine.url, timeout=10) as client:
        yield client


def sse_events(lines: Iterator[str]) -> list[Any]:
    """Payloads of `data:` lines; "[DONE]" kept as a string."""
    events: list[Any] = []
    for line in lines:
        if not line.startswith("data: "):
            continue
        payload = line[len("data: ") :]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def test_non_streaming_chat(client: httpx.Client) -> None:
    response = client.post("/v1/chat/completions", json=CHAT_BODY)
    assert response.status_code == 200
    data = response.json()
    assert data["object"] == "chat.completion"
    assert data["model"] == "m1"
    assert data["id"]
    assert isinstance(data["created"], int)
    assert data["choices"][0]["message"] == {"role": "assistant", "content": "w0 w1 w2 w3 w4 "}
    assert data["choices"][0]["finish_reason"] == "stop"
    # "be brief" + "hello there friend" = 5 words.
    assert data["usage"] == {
        "prompt_tokens": 5,
        "completion_tokens": 5,
        "total_tokens": 10,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    timings = data["timings"]
    assert timings["prompt_n"] == 5
    assert timings["predicted_n"] == 5
    assert {"prompt_ms", "predicted_ms", "cache_n"} <= timings.keys()


def test_text_completion_and_header_knobs(client: httpx.Client) -> None:
    response = client.post(
        "/v1/completions",
        json={"model": "m2", "prompt": "one two three"},
        headers={"X-Fake-Chunks": "2"},
    )
    data = response.json()
    assert data["object"] == "text_completion"
    assert data["choices"][0]["text"] == "w0 w1 "
    assert data["usage"]["prompt_tokens"] == 3


def test_body_knobs_win_over_headers(client: httpx.Client) -> None:
    body = {**CHAT_BODY, "fake": {"chunks": 3, "no_usage": True}}
    data = client.post("/v1/chat/completions", json=body, headers={"X-Fake-Chunks": "7"}).json()
    assert data["choices"][0]["message"]["content"] == "w0 w1 w2 "
    assert "usage" not in data
    assert "timings" not in data


def test_streaming_without_usage(client: httpx.Client) -> None:
    body = {**CHAT_BODY, "stream": True, "fake": {"chunks": 3}}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    contents = [c["choices"][0]["delta"].get("content") for c in chunks[1:-1]]
    assert contents == ["w0 ", "w1 ", "w2 "]
    assert chunks[-1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }


def test_streaming_with_include_usage(client: httpx.Client) -> None:
    body = {**CHAT_BODY, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        events = sse_events(response.iter_lines())
    assert events[-1] == "[DONE]"
    *chunks, usage_chunk = events[:-1]
    assert all(c["usage"] is None for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 5
    assert usage_chunk["timings"]["predicted_n"] == 5


@pytest.mark.parametrize(
    ("status", "kind"), [(503, "server_error"), (429, "invalid_request_error")]
)
def test_error_status(client: httpx.Client, status: int, kind: str) -> None:
    body = {**CHAT_BODY, "fake": {"error_status": status}}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == status
    assert response.json() == {
        "error": {"code": status, "message": f"fake error {status}", "type": kind}
    }


def test_error_text(client: httpx.Client) -> None:
    body = {**CHAT_BODY, "fake": {"error_status": 502, "error_text": "upstream down"}}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 502
    assert response.text == "upstream down"


@pytest.mark.parametrize("chunk_delay", [0.0, 0.01])
def test_drop_after_breaks_the_stream(client: httpx.Client, chunk_delay: float) -> None:
    body = {
        **CHAT_BODY,
        "stream": True,
        "fake": {"chunks": 10, "drop_after": 2, "chunk_delay": chunk_delay},
    }
    received: list[str] = []
    with (
        pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)),
        client.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        received.extend(response.iter_lines())  # keeps the lines read before the break
    events = sse_events(iter(received))
    assert "[DONE]" not in events
    assert [e["choices"][0]["delta"].get("content") for e in events[1:]] == ["w0 ", "w1 "]


def test_client_disconnect_is_recorded_as_cancelled(
    engine: FakeEngineProcess, client: httpx.Client
) -> None:
    body = {**CHAT_BODY, "stream": True, "fake": {"chunks": 20, "chunk_delay": 0.2}}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        for line in response.iter_lines():
            if '"content":"w0 "' in line:
                break  # leaving the block closes the connection mid-stream
    closed_at = time.time()
    deadline = time.monotonic() + 1.0
    record: dict[str, Any] = {}
    while time.monotonic() < deadline:
        record = engine.requests()[-1]
        if record["cancelled"]:
            break
        time.sleep(0.02)
    assert record["path"] == "/v1/chat/completions"
    assert record["cancelled"] is True
    assert record["finished_at"] is None
    assert record["cancelled_at"] - closed_at < 1.0
    assert 1 <= record["chunks_sent"] < 20


def test_recording_shape(engine: FakeEngineProcess, client: httpx.Client) -> None:
    client.post("/tokenize", json={"content": "a b c"}, headers={"X-Custom-Header": "yes"})
    client.get("/_fake/requests")  # inspection calls are not recorded
    (record,) = engine.requests()
    assert record["path"] == "/tokenize"
    assert record["method"] == "POST"
    assert record["headers"]["X-Custom-Header"] == "yes"
    assert record["body"] == {"content": "a b c"}
    assert record["finished_at"] >= record["started_at"]
    assert record["cancelled"] is False
    assert record["cancelled_at"] is None


def test_auxiliary_endpoints(client: httpx.Client) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["m1", "m2"]
    tokens = client.post("/tokenize", json={"content": "hello there"}).json()["tokens"]
    assert len(tokens) == 2
    assert all(isinstance(t, int) for t in tokens)
    prompt = client.post("/apply-template", json={"messages": CHAT_BODY["messages"]}).json()
    assert prompt["prompt"] == "<|system|>\nbe brief\n<|user|>\nhello there friend\n<|assistant|>\n"
    props = client.get("/props").json()
    assert props["default_generation_settings"]["n_ctx"] == 4096
    assert props["total_slots"] == 4
    missing = client.get("/nope")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == 404


def test_embeddings_are_deterministic_unit_vectors(client: httpx.Client) -> None:
    data = client.post("/v1/embeddings", json={"input": ["a b", "a b", "c"]}).json()
    vectors = [d["embedding"] for d in data["data"]]
    assert data["object"] == "list"
    assert [d["index"] for d in data["data"]] == [0, 1, 2]
    assert len(vectors[0]) == 8
    assert vectors[0] == vectors[1] != vectors[2]
    assert abs(sum(x * x for x in vectors[2]) - 1.0) < 1e-9
    wide = client.post("/v1/embeddings", json={"input": "x", "dimensions": 32}).json()
    assert len(wide["data"][0]["embedding"]) == 32


def test_rerank(client: httpx.Client) -> None:
    body = {"query": "red apple", "documents": ["green apple", "red apple pie", "kiwi"], "top_n": 2}
    data = client.post("/v1/rerank", json=body).json()
    assert data["results"] == [
        {"index": 1, "relevance_score": 1.0},
        {"index": 0, "relevance_score": 0.5},
    ]
