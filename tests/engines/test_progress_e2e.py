"""While a managed engine starts for a streamed request, the client gets SSE comment
lines (never content); a whole request just waits. A real gateway, a slow fake engine."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import GatewayProcess, start_gateway
from tests.engines.manager_helpers import FAKE_TEMPLATE, managed_engine
from tests.engines.test_managed_e2e import gateway_env

pytestmark = pytest.mark.django_db(transaction=True)

BODY = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def slow_gateway(db, tmp_path: Path) -> Iterator[GatewayProcess]:
    from django.db import connection

    env = {**gateway_env(tmp_path), "ENGINE_PROGRESS_SECONDS": "1", "METRICS_TOKEN": "t"}
    gateway = start_gateway(connection.settings_dict, tmp_path / "gateway.log", env=env)
    yield gateway
    gateway.stop()


def stream_lines(gateway: GatewayProcess, key) -> list[str]:
    with httpx.stream(
        "POST",
        f"{gateway.base_url}/chat/completions",
        json={**BODY, "stream": True},
        headers=key.auth,
        timeout=60,
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        return [line for line in response.iter_lines() if line]


def test_it_sends_loading_comments_while_the_engine_starts(slow_gateway, alice) -> None:
    managed_engine(ctx_sizes=(1024,), template=FAKE_TEMPLATE + " --startup-delay 3.5")
    lines = stream_lines(slow_gateway, alice)
    comments = [line for line in lines if line.startswith(":")]
    assert comments[:2] == [": loading model fake-model (1 s)", ": loading model fake-model (2 s)"]
    data = [line for line in lines if line.startswith("data: ")]
    assert lines.index(comments[-1]) < lines.index(data[0])  # comments before content only
    assert data[-1] == "data: [DONE]"
    assert any('"content"' in line for line in data[:-1])
    # Running now: no comments for the next stream.
    assert not [line for line in stream_lines(slow_gateway, alice) if line.startswith(":")]
    # The detailed health shows the replica that started, and the metrics its load time.
    health = httpx.get(
        f"{slow_gateway.url}/health/detailed", headers={"Authorization": "Bearer t"}
    ).json()
    (engine,) = health["engines"]
    (replica,) = engine["replicas"]
    assert (replica["state"], replica["variant"], replica["last_error"]) == (
        "running", "fake-model ctx=1024", "",
    )  # fmt: skip
    assert psutil.pid_exists(replica["pid"])
    assert (engine["slots_in_use"], engine["queued"], replica["circuit"]["state"]) == (
        0, 0, "closed",
    )  # fmt: skip
    metrics = httpx.get(f"{slow_gateway.url}/metrics", headers={"Authorization": "Bearer t"})
    assert 'gateway_engine_starts_total{engine="local"} 1.0' in metrics.text
    load = [
        line for line in metrics.text.splitlines()
        if line.startswith('gateway_engine_load_duration_seconds_sum{engine="local"}')
    ]  # fmt: skip
    assert float(load[0].split()[-1]) >= 3.5


def test_a_whole_request_just_waits(slow_gateway, alice) -> None:
    managed_engine(ctx_sizes=(1024,), template=FAKE_TEMPLATE + " --startup-delay 2.5")
    response = httpx.post(
        f"{slow_gateway.base_url}/chat/completions", json=BODY, headers=alice.auth, timeout=60
    )
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"]


def test_a_start_that_fails_after_comments_ends_the_stream_with_an_error(
    slow_gateway, alice
) -> None:
    managed_engine(
        ctx_sizes=(1024,),
        template=FAKE_TEMPLATE + " --startup-delay 30",
        startup_timeout_seconds=2.5,
    )
    lines = stream_lines(slow_gateway, alice)
    assert lines[0] == ": loading model fake-model (1 s)"
    assert '"engine_unavailable"' in lines[-2]
    assert lines[-1] == "data: [DONE]"
