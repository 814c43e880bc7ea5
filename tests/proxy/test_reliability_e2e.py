"""Retries before the first byte, model fallbacks and circuit breakers, through a real
gateway with fake engine processes (one of them killed mid-run)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from apps.engines.models import Engine, EngineVariant, ServedModel
from apps.engines.services import engine_register_external, served_model_set_fallbacks
from tests.conftest import (
    FAKE_MODEL,
    GatewayProcess,
    free_port,
    request_logs,
    start_gateway,
    wait_until,
)
from tests.fake_engine import FakeEngineProcess

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(scope="module")
def reliable(django_db_setup, django_db_blocker, tmp_path_factory) -> Iterator[GatewayProcess]:
    """A gateway of its own: these tests open circuits, which live in its memory."""
    from django.db import connection

    env = {
        "ENGINE_RETRIES": "2",
        "ENGINE_RETRY_BACKOFF_SECONDS": "0.05",
        "CIRCUIT_BREAKER_FAILURES": "3",
        "CIRCUIT_BREAKER_COOLDOWN_SECONDS": "60",
        "METRICS_TOKEN": "ops-token",
        "SCHEDULER_MAX_WAIT_SECONDS": "1",
    }
    log_path = tmp_path_factory.mktemp("reliable") / "gateway.log"
    gateway = start_gateway(connection.settings_dict, log_path, env=env)
    yield gateway
    gateway.stop()


@pytest.fixture
def replicas() -> Iterator[tuple[FakeEngineProcess, FakeEngineProcess]]:
    with FakeEngineProcess().start("--model", "duo") as a, FakeEngineProcess().start() as b:
        yield a, b


def chat(gateway: GatewayProcess, key, model: str, **body) -> httpx.Response:
    payload = {"model": model, "messages": [{"role": "user", "content": "hi"}], **body}
    return httpx.post(
        f"{gateway.base_url}/chat/completions", json=payload, headers=key.auth, timeout=20
    )


def chat_requests(engine: FakeEngineProcess) -> list:
    return [r for r in engine.requests() if r["path"] == "/v1/chat/completions"]


def circuits(gateway: GatewayProcess, engine: str) -> list[dict]:
    health = httpx.get(
        f"{gateway.url}/health/detailed", headers={"Authorization": "Bearer ops-token"}
    ).json()
    (entry,) = [e for e in health["engines"] if e["name"] == engine]
    return [replica["circuit"] for replica in entry["replicas"]]


def test_it_retries_on_the_other_replica_when_one_is_killed(reliable, alice, replicas):
    a, b = replicas
    engine_register_external(
        name="duo", base_url=a.url, extra_base_urls=[b.url], models=["duo"], ctx_size=4096
    )
    assert chat(reliable, alice, "duo").status_code == 200
    a.stop()  # killed mid-run
    statuses = [chat(reliable, alice, "duo").status_code for _ in range(6)]
    assert statuses == [200] * 6
    assert len(chat_requests(b)) >= 6
    # Replica 0 failed three times in a row: its circuit is open, it is skipped now.
    assert [c["state"] for c in circuits(reliable, "duo")] == ["open", "closed"]
    assert "connect" in circuits(reliable, "duo")[0]["last_error"].lower()
    logs = wait_until(lambda: len(request_logs(tenant=alice.tenant)) == 7 and request_logs())
    assert {log.status_code for log in logs} == {200}


def test_it_retries_an_engines_503_and_relays_it_when_retries_are_spent(
    reliable, alice, fake_engine
):
    fake_engine.reset()
    engine_register_external(name="flaky", base_url=fake_engine.url, models=["flaky"])
    assert chat(reliable, alice, "flaky", fake={"error_status": 500}).status_code == 500
    assert len(chat_requests(fake_engine)) == 1  # a 500 is the engine's answer: no retry
    fake_engine.reset()
    response = chat(reliable, alice, "flaky", fake={"error_status": 503})
    assert response.status_code == 503
    assert response.json()["error"]["message"] == "fake error 503"
    assert len(chat_requests(fake_engine)) == 3  # the first attempt and two retries
    # Three failures in a row: the engine is skipped now, without calling it.
    response = chat(reliable, alice, "flaky")
    assert response.status_code == 503
    assert "circuit open" in response.json()["error"]["message"]
    assert len(chat_requests(fake_engine)) == 3
    assert circuits(reliable, "flaky")[0]["state"] == "open"


def test_it_never_retries_after_the_first_byte(reliable, alice, fake_engine, engine):
    body = {"stream": True, "fake": {"chunks": 10, "drop_after": 3}}
    with httpx.stream(
        "POST",
        f"{reliable.base_url}/chat/completions",
        json={"model": FAKE_MODEL, "messages": [{"role": "user", "content": "hi"}], **body},
        headers=alice.auth,
    ) as response:
        lines = [line for line in response.iter_lines() if line]
    assert '"engine_stream_interrupted"' in lines[-2]
    assert len(chat_requests(fake_engine)) == 1


def _dead_model(name: str) -> ServedModel:
    dead = Engine.objects.create(name=f"{name}-engine", base_url=f"http://127.0.0.1:{free_port()}")
    model = ServedModel.objects.create(name=name)
    EngineVariant.objects.create(engine=dead, model=model, ctx_size=4096)
    return model


def test_it_serves_a_down_model_with_its_first_fallback_that_is_up(reliable, alice, engine):
    _dead_model("primary")
    _dead_model("second")
    served_model_set_fallbacks(name="primary", fallbacks=["second", FAKE_MODEL])
    client = openai.OpenAI(base_url=reliable.base_url, api_key=alice.raw_key, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="primary", messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.headers["x-gateway-model"] == FAKE_MODEL
    assert raw.parse().model == FAKE_MODEL
    chunks = list(
        client.chat.completions.create(
            model="primary", messages=[{"role": "user", "content": "hi"}], stream=True
        )
    )
    assert {chunk.model for chunk in chunks} == {FAKE_MODEL}
    logs = wait_until(lambda: len(request_logs(tenant=alice.tenant)) == 2 and request_logs())
    assert [(log.model, log.engine, log.status_code) for log in logs] == [
        (FAKE_MODEL, "fake", 200),
        (FAKE_MODEL, "fake", 200),
    ]
    assert logs[0].prompt_tokens > 0  # the fallback's usage is what is counted


def test_it_names_the_model_that_served_when_no_fallback_was_needed(reliable, alice, engine):
    assert chat(reliable, alice, FAKE_MODEL).headers["x-gateway-model"] == FAKE_MODEL


def test_it_never_falls_back_to_a_model_the_tenant_may_not_use(
    reliable, alice, engine, fake_engine
):
    primary = _dead_model("guarded")
    served_model_set_fallbacks(name="guarded", fallbacks=[FAKE_MODEL])
    alice.tenant.restrict_models = True
    alice.tenant.save()
    alice.tenant.allowed_models.set([primary])
    response = chat(reliable, alice, "guarded")
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "engine_unreachable"
    assert chat_requests(fake_engine) == []


def test_it_sends_an_overloaded_models_request_to_its_fallback(
    reliable, alice, engine, fake_engine
):
    engine_register_external(name="narrow", base_url=fake_engine.url, models=["narrow"], slots=1)
    served_model_set_fallbacks(name="narrow", fallbacks=[FAKE_MODEL])
    slow: list[httpx.Response] = []
    holder = threading.Thread(
        target=lambda: slow.append(chat(reliable, alice, "narrow", fake={"delay": 3}))
    )
    holder.start()
    time.sleep(0.7)  # the one slot is taken; the next request waits 1 s, then falls back
    response = chat(reliable, alice, "narrow")
    holder.join()
    assert response.status_code == 200
    assert response.headers["x-gateway-model"] == FAKE_MODEL
    assert response.json()["model"] == FAKE_MODEL
    assert slow[0].headers["x-gateway-model"] == "narrow"
