"""Transparent proxying: unknown fields and headers reach the engine untouched."""

from __future__ import annotations

import httpx
import orjson
import pytest

from tests.conftest import FAKE_MODEL

pytestmark = pytest.mark.django_db(transaction=True)


def test_it_passes_unknown_fields_to_the_engine_unchanged(engine, gateway, alice, fake_engine):
    body = {
        "model": FAKE_MODEL,
        "messages": [{"role": "user", "content": "hi", "name": "carol"}],
        "temperature": 0.2,
        "cache_prompt": True,
        "id_slot": 3,
        "grammar": 'root ::= "x"',
        "nested": {"deep": [1, 2, {"x": None}]},
    }
    raw = orjson.dumps(body)
    response = httpx.post(
        f"{gateway.base_url}/chat/completions",
        headers={**alice.auth, "Content-Type": "application/json"},
        content=raw,
    )
    assert response.status_code == 200
    seen = fake_engine.requests()[-1]
    assert seen["path"] == "/v1/chat/completions"
    assert seen["body"] == body


def test_it_asks_the_engine_for_usage_on_streams_keeping_other_stream_options(
    engine, gateway, alice, fake_engine
):
    body = {
        "model": FAKE_MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"continuous_usage_stats": False},
        "custom": "kept",
    }
    with httpx.stream(
        "POST", f"{gateway.base_url}/chat/completions", json=body, headers=alice.auth
    ) as r:
        r.read()
    seen = fake_engine.requests()[-1]["body"]
    assert seen["stream_options"] == {"continuous_usage_stats": False, "include_usage": True}
    assert seen["custom"] == "kept"


def test_it_passes_headers_except_hop_by_hop_and_authorization(engine, gateway, alice, fake_engine):
    headers = {
        **alice.auth,
        "X-Custom-Trace": "trace-123",
        "OpenAI-Organization": "org-9",
        "User-Agent": "my-agent/1.0",
        "Connection": "keep-alive, X-Hop-Named",
        "X-Hop-Named": "must-not-pass",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "Proxy-Authorization": "Basic abc",
    }
    body = {"model": FAKE_MODEL, "messages": [{"role": "user", "content": "hi"}]}
    assert (
        httpx.post(f"{gateway.base_url}/chat/completions", json=body, headers=headers).status_code
        == 200
    )
    seen = {name.lower(): value for name, value in fake_engine.requests()[-1]["headers"].items()}
    assert seen["x-custom-trace"] == "trace-123"
    assert seen["openai-organization"] == "org-9"
    assert seen["user-agent"] == "my-agent/1.0"
    assert "authorization" not in seen
    for hop in ("x-hop-named", "keep-alive", "te", "proxy-authorization"):
        assert hop not in seen, hop
    assert alice.raw_key not in orjson.dumps(fake_engine.requests()[-1]).decode()


def test_it_sends_the_engines_own_key_when_configured(engine, gateway, alice, fake_engine):
    engine.upstream_api_key = "engine-secret"
    engine.save()
    body = {"model": FAKE_MODEL, "messages": [{"role": "user", "content": "hi"}]}
    assert (
        httpx.post(
            f"{gateway.base_url}/chat/completions", json=body, headers=alice.auth
        ).status_code
        == 200
    )
    seen = {name.lower(): value for name, value in fake_engine.requests()[-1]["headers"].items()}
    assert seen["authorization"] == "Bearer engine-secret"
