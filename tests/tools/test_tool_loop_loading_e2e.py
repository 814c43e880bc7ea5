"""A streamed tool loop whose rounds wait for a managed engine to start gets the same
`: loading model X (N s)` comments as a plain streamed call: the first round (the engine
not yet started) and a later one (the engine stopped, idle, while the tool ran). A real
gateway, the fake engine started by it as its own process, the subprocess sandbox."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from apps.tools.services import tools_allow
from tests.conftest import GatewayProcess, start_gateway
from tests.engines.manager_helpers import FAKE_TEMPLATE, managed_engine
from tests.engines.test_managed_e2e import gateway_env

pytestmark = pytest.mark.django_db(transaction=True)

LOADING = ": loading model fake-model"
TOOL = ": tool python running"


@pytest.fixture
def loading_gateway(db, tmp_path: Path) -> Iterator[GatewayProcess]:
    from django.db import connection

    env = {
        **gateway_env(tmp_path),
        "ENGINE_PROGRESS_SECONDS": "1",
        "TOOLS_TIMEOUT_SECONDS": "15",
        "TOOLS_MAX_ROUNDS": "3",
        "METRICS_TOKEN": "t",
    }
    gateway = start_gateway(connection.settings_dict, tmp_path / "gateway.log", env=env)
    yield gateway
    gateway.stop()


def streamed_tool_call(gateway: GatewayProcess, key, code: str) -> list[str]:
    body = {
        "model": "fake-model",
        "messages": [{"role": "user", "content": "run it"}],
        "tools": [{"type": "python"}],
        "stream": True,
        "fake": {"tool_call": "python", "tool_args": json.dumps({"code": code})},
    }
    with httpx.stream(
        "POST", f"{gateway.base_url}/chat/completions", json=body, headers=key.auth, timeout=90
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        return [line for line in response.iter_lines() if line]


def content_of(lines: list[str]) -> str:
    text = ""
    for line in lines:
        if line.startswith("data: {"):
            for choice in json.loads(line.removeprefix("data: "))["choices"]:
                text += (choice.get("delta") or {}).get("content") or ""
    return text


def test_the_first_round_streams_loading_comments_while_the_engine_starts(
    loading_gateway, alice
) -> None:
    tools_allow(tenant=alice.tenant, tools=["python"])
    managed_engine(ctx_sizes=(1024,), template=FAKE_TEMPLATE + " --startup-delay 2.5")
    lines = streamed_tool_call(loading_gateway, alice, "print(6 * 7)")
    assert lines[:2] == [f"{LOADING} (1 s)", f"{LOADING} (2 s)"]
    assert lines.index(TOOL) > 1
    assert not [line for line in lines[lines.index(TOOL) :] if line.startswith(LOADING)]
    assert json.loads(content_of(lines).removeprefix("Tool said: "))["stdout"] == "42\n"
    assert lines[-1] == "data: [DONE]"


def test_a_later_round_streams_loading_comments_when_the_engine_stopped_meanwhile(
    loading_gateway, alice
) -> None:
    """The engine stops after 1 s idle; the tool takes 4 s: the second round starts it
    again, and the client sees that start as it saw the first."""
    tools_allow(tenant=alice.tenant, tools=["python"])
    managed_engine(
        ctx_sizes=(1024,), template=FAKE_TEMPLATE + " --startup-delay 2.5", idle_ttl_seconds=1
    )
    lines = streamed_tool_call(loading_gateway, alice, "import time; time.sleep(4); print('up')")
    tool = lines.index(TOOL)
    before = [line for line in lines[:tool] if line.startswith(":")]
    after = [line for line in lines[tool + 1 :] if line.startswith(":")]
    assert before[:2] == [f"{LOADING} (1 s)", f"{LOADING} (2 s)"]
    assert after[:2] == [f"{LOADING} (1 s)", f"{LOADING} (2 s)"]
    # The second round's comments all come before its first chunk.
    second_round = lines[tool + 1 :]
    last_comment = max(i for i, line in enumerate(second_round) if line.startswith(LOADING))
    first_data = min(i for i, line in enumerate(second_round) if line.startswith("data: "))
    assert last_comment < first_data
    assert json.loads(content_of(lines).removeprefix("Tool said: "))["stdout"] == "up\n"
    assert lines[-1] == "data: [DONE]"
    metrics = httpx.get(
        f"{loading_gateway.url}/metrics", headers={"Authorization": "Bearer t"}, timeout=5
    )
    assert 'gateway_engine_starts_total{engine="local"} 2.0' in metrics.text  # it did stop


def test_a_start_that_fails_after_comments_ends_the_loop_with_an_error_event(
    loading_gateway, alice
) -> None:
    tools_allow(tenant=alice.tenant, tools=["python"])
    managed_engine(
        ctx_sizes=(1024,),
        template=FAKE_TEMPLATE + " --startup-delay 30",
        startup_timeout_seconds=2.5,
    )
    lines = streamed_tool_call(loading_gateway, alice, "print(1)")
    assert lines[0] == f"{LOADING} (1 s)"
    assert TOOL not in lines  # the first round never ran
    assert '"engine_unavailable"' in lines[-2]
    assert lines[-1] == "data: [DONE]"
