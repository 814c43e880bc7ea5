"""Managed engines through the whole /v1 pipeline: a real gateway process launches the
fake engine as its own process, sizes requests with that process's tokenizer, answers
a failed start with a 503 carrying the engine's log, carries out admin actions without
waiting for a request, spreads sessions over replicas, and stops its engines with it."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from apps.engines.models import EngineInstance
from apps.engines.services import engine_instance_request_action
from tests.conftest import GatewayProcess, start_gateway, wait_until
from tests.engines.manager_helpers import managed_engine

pytestmark = pytest.mark.django_db(transaction=True)

MODEL = "fake-model"


def gateway_env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "models").mkdir(exist_ok=True)
    return {
        "ENGINE_MANAGER_AUTOSTART": "1",
        "MODELS_DIR": str(tmp_path / "models"),
        "ENGINE_LOG_DIR": str(tmp_path / "engine-logs"),
        "ENGINE_OWNER_POLL_SECONDS": "0.1",
        "ENGINE_SWAP_GRACE_SECONDS": "0.5",
        "ENGINE_RESTART_BACKOFF_SECONDS": "0.1",
    }


@pytest.fixture
def managed_gateway(db, tmp_path: Path) -> Iterator[GatewayProcess]:
    from django.db import connection

    gateway = start_gateway(
        connection.settings_dict, tmp_path / "gateway.log", env=gateway_env(tmp_path)
    )
    yield gateway
    gateway.stop()


@pytest.fixture
def client(managed_gateway: GatewayProcess, alice) -> openai.OpenAI:
    return openai.OpenAI(base_url=managed_gateway.base_url, api_key=alice.raw_key, max_retries=0)


def rows(engine) -> list[EngineInstance]:
    return list(EngineInstance.objects.filter(engine=engine).order_by("replica"))


def running_row(engine, replica: int = 0) -> EngineInstance | None:
    row = EngineInstance.objects.filter(engine=engine, replica=replica).first()
    return row if row is not None and row.state == "running" and row.pid else None


def chat(client: openai.OpenAI, content: str = "hi", **kwargs):
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], **kwargs
    )


def engine_requests(row: EngineInstance) -> list[dict]:
    """What the managed fake engine process received (its own record of requests)."""
    return httpx.get(f"{row.base_url}/_fake/requests", timeout=5).json()


def test_it_starts_a_managed_engine_on_the_first_request(client, alice) -> None:
    engine, _ = managed_engine(ctx_sizes=(1024,))
    assert running_row(engine) is None

    answer = chat(client)

    assert answer.choices[0].message.content
    row = wait_until(lambda: running_row(engine))
    assert psutil.pid_exists(row.pid)
    assert any(r["path"] == "/v1/chat/completions" for r in engine_requests(row))


def test_it_sizes_requests_with_the_running_engines_tokenizer(client) -> None:
    """250 words of 16 letters: ~1,000 tokens by the 4-characters heuristic (too many for
    the 1024 variant with max_tokens 100), 250 by the engine's tokenizer (fits)."""
    engine, (small, _) = managed_engine(ctx_sizes=(1024, 2048))
    chat(client, max_tokens=10)  # starts the smallest variant
    first = wait_until(lambda: running_row(engine))

    chat(client, " ".join(["abcdefghijklmnop"] * 250), max_tokens=100)

    row = running_row(engine)
    assert (row.variant_id, row.pid) == (small.pk, first.pid)  # no swap to 2048
    paths = [r["path"] for r in engine_requests(row)]
    assert "/apply-template" in paths
    assert "/tokenize" in paths


def test_it_swaps_to_the_variant_a_long_prompt_needs(client) -> None:
    engine, (_, large) = managed_engine(ctx_sizes=(1024, 2048))
    chat(client, max_tokens=10)
    first = wait_until(lambda: running_row(engine))

    answer = chat(client, " ".join(["word"] * 1500), max_tokens=100)

    assert answer.choices[0].message.content
    row = running_row(engine)
    assert row.variant_id == large.pk
    assert row.pid != first.pid
    assert not psutil.pid_exists(first.pid) or psutil.Process(first.pid).status() == "zombie"


def test_it_trims_session_history_with_the_engines_tokenizer(client) -> None:
    """Three stored turns of 200 long words: ~600 tokens each by the heuristic (only the
    newest would fit 1024 - 100), ~200 by the tokenizer, so the whole history is sent. The
    first turn starts the engine, so it is counted once the engine runs."""
    engine, _ = managed_engine(ctx_sizes=(1024,))
    session = {"X-Session-Id": "long-words"}
    for turn in range(3):
        chat(client, f"turn{turn} " + " ".join(["abcdefghijkl"] * 200), max_tokens=100,
             extra_headers=session)  # fmt: skip

    chat(client, "last", max_tokens=100, extra_headers=session)

    sent = [r for r in engine_requests(running_row(engine)) if r["path"] == "/v1/chat/completions"]
    contents = [m["content"] for m in sent[-1]["body"]["messages"] if m["role"] == "user"]
    assert [c.split()[0] for c in contents] == ["turn0", "turn1", "turn2", "last"]


def test_it_answers_503_with_the_engines_log_when_it_cannot_start(client) -> None:
    managed_engine(ctx_sizes=(1024,), extra_args="--no-such-flag")

    with pytest.raises(openai.APIStatusError) as caught:
        chat(client)

    assert caught.value.status_code == 503
    error = caught.value.body
    assert error["code"] == "engine_unavailable"
    assert "unrecognized arguments: --no-such-flag" in error["message"]
    assert int(caught.value.response.headers["retry-after"]) >= 1


def test_it_carries_out_an_admin_start_without_any_request(managed_gateway) -> None:
    engine, _ = managed_engine(ctx_sizes=(1024,))

    engine_instance_request_action(engine=engine, action=EngineInstance.Action.START)

    row = wait_until(lambda: running_row(engine), timeout=20)
    assert psutil.pid_exists(row.pid)


def test_it_spreads_concurrent_sessions_over_replicas(client) -> None:
    engine, _ = managed_engine(ctx_sizes=(1024,), replicas=2, slots=1)
    results: list[str] = []

    def one(session: str) -> None:
        answer = chat(client, extra_headers={"X-Session-Id": session},
                      extra_body={"fake": {"delay": 1.0}})  # fmt: skip
        results.append(answer.choices[0].message.content or "")

    threads = [threading.Thread(target=one, args=(f"s{i}",)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert len(results) == 2
    first, second = wait_until(lambda: both_running(engine))
    assert first.pid != second.pid
    assert [len(engine_requests(row)) > 0 for row in (first, second)] == [True, True]


def both_running(engine) -> tuple[EngineInstance, EngineInstance] | None:
    first, second = running_row(engine, 0), running_row(engine, 1)
    return (first, second) if first and second else None


def test_it_stops_its_engines_when_the_gateway_stops(client, managed_gateway) -> None:
    engine, _ = managed_engine(ctx_sizes=(1024,))
    chat(client)
    pid = wait_until(lambda: running_row(engine)).pid

    managed_gateway.process.send_signal(signal.SIGTERM)
    managed_gateway.process.wait(timeout=30)

    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
    assert rows(engine)[0].state == "stopped"


def test_it_sends_each_variant_to_the_replica_already_running_it(client) -> None:
    """Two replicas, one slot each: the short and the long request each get a replica of
    their own, and later ones go back to them: two starts, no swap."""
    engine, (small, large) = managed_engine(ctx_sizes=(1024, 2048), replicas=2, slots=1)
    long_prompt = " ".join(["word"] * 1500)

    chat(client, max_tokens=10)
    chat(client, long_prompt, max_tokens=100)
    first = wait_until(lambda: both_running(engine))
    for _ in range(2):
        chat(client, max_tokens=10)
        chat(client, long_prompt, max_tokens=100)

    now = both_running(engine)
    assert {row.variant_id for row in now} == {small.pk, large.pk}
    assert [row.pid for row in now] == [row.pid for row in first]  # nothing restarted
