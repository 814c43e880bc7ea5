"""A client that leaves mid-stream cancels the engine request, and its usage is recorded."""

from __future__ import annotations

import asyncio
import time

import httpx
import orjson
import pytest

from tests.conftest import FAKE_MODEL, request_logs, wait_until

pytestmark = pytest.mark.django_db(transaction=True)


def _cancelled_request(fake_engine) -> dict | None:
    return next((r for r in fake_engine.requests() if r["cancelled"]), None)


def test_it_cancels_the_engine_request_when_the_client_disconnects(
    engine, gateway, alice, fake_engine
):
    body = {
        "model": FAKE_MODEL,
        "messages": [{"role": "user", "content": "tell me a long story"}],
        "stream": True,
        "fake": {"chunks": 200, "chunk_delay": 0.05},
    }
    received = 0
    with httpx.stream(
        "POST", f"{gateway.base_url}/chat/completions", json=body, headers=alice.auth
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and orjson.loads(line[6:])["choices"][0]["delta"].get(
                "content"
            ):
                received += 1
            if received == 5:
                break
        left_at = time.time()
    seen = wait_until(lambda: _cancelled_request(fake_engine), timeout=5)
    assert seen["cancelled_at"] - left_at < 1.0
    assert seen["chunks_sent"] < 50  # generation stopped long before its 200 chunks

    log = wait_until(lambda: request_logs(tenant=alice.tenant))[0]
    assert log.client_disconnected
    assert log.usage_estimated
    assert log.status_code == 200
    assert 5 <= log.completion_tokens < 50
    assert log.prompt_tokens >= 1


@pytest.mark.parametrize(
    "read_timeout",
    [
        0.5,
        # Gone before the watcher starts (DisconnectWatch.WATCH_AFTER_SECONDS): seen as
        # soon as it does.
        0.005,
    ],
)
def test_it_cancels_a_waiting_non_streaming_request_too(
    engine, gateway, alice, fake_engine, read_timeout: float
):
    async def leave_early() -> None:
        body = {
            "model": FAKE_MODEL,
            "messages": [{"role": "user", "content": "x"}],
            "fake": {"delay": 5},
        }
        async with httpx.AsyncClient() as client:
            with pytest.raises(httpx.ReadTimeout):
                await client.post(
                    f"{gateway.base_url}/chat/completions",
                    json=body,
                    headers=alice.auth,
                    timeout=httpx.Timeout(5, read=read_timeout),
                )

    asyncio.run(leave_early())
    left_at = time.time()
    seen = wait_until(lambda: _cancelled_request(fake_engine), timeout=5)
    assert seen["cancelled_at"] - left_at < 1.0
    log = wait_until(lambda: request_logs(tenant=alice.tenant))[0]
    assert (log.client_disconnected, log.status_code, log.completion_tokens) == (True, 499, 0)
