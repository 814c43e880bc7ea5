"""The tool loop end to end: OpenAI SDK → gateway → fake engine asks for a built-in tool →
sandbox → fake engine answers with the tool's result."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from apps.tools.models import ToolRun
from apps.tools.sandbox.local import NOBODY
from apps.tools.services import tools_allow
from tests.conftest import FAKE_MODEL, request_logs, wait_until
from tests.tools.sandbox_helpers import processes_of_uid, processes_with

pytestmark = pytest.mark.django_db(transaction=True)


def client_for(gateway, tenant_key) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key=tenant_key.raw_key, max_retries=0)


def fake_call(tool: str, rounds: int = 1, **arguments: str) -> dict:
    return {"fake": {"tool_call": tool, "tool_args": json.dumps(arguments), "tool_rounds": rounds}}


def tool_result(reply_text: str) -> dict:
    assert reply_text.startswith("Tool said: "), reply_text
    return json.loads(reply_text.removeprefix("Tool said: "))


def runs(**filters) -> list[ToolRun]:
    return list(ToolRun.objects.filter(**filters).order_by("created_at"))


@pytest.fixture
def allowed_alice(alice):
    tools_allow(tenant=alice.tenant, tools=["python", "bash", "web_search"])
    return alice


def test_the_model_runs_python_and_answers_with_its_output(
    engine_requests, tools_gateway, allowed_alice
):
    reply = client_for(tools_gateway, allowed_alice).chat.completions.create(
        model=FAKE_MODEL,
        messages=[{"role": "user", "content": "what is 6 times 7?"}],
        tools=[{"type": "python"}],
        extra_body=fake_call("python", code="print(6 * 7)"),
    )
    assert tool_result(reply.choices[0].message.content) == {
        "exit_code": 0,
        "stdout": "42\n",
        "stderr": "",
    }
    first, second = engine_requests()
    assert first["body"]["tools"][0]["function"]["name"] == "python"
    assert second["body"]["messages"][-2]["tool_calls"][0]["function"]["name"] == "python"
    assert second["body"]["messages"][-1]["role"] == "tool"
    run = wait_until(lambda: runs(tenant=allowed_alice.tenant))[0]
    assert (run.tool, run.command_excerpt, run.exit_code, run.backend) == (
        "python",
        "print(6 * 7)",
        0,
        "subprocess",
    )
    logs = wait_until(
        lambda: (
            len(request_logs(tenant=allowed_alice.tenant)) == 2
            and request_logs(tenant=allowed_alice.tenant)
        )
    )
    assert [log.status_code for log in logs] == [200, 200]  # one per round


@pytest.fixture
def engine_requests(engine, fake_engine):
    """The chat requests the fake engine received in this test."""
    return lambda: [r for r in fake_engine.requests() if r.get("path") == "/v1/chat/completions"]


def test_a_streamed_answer_streams_the_final_round(engine_requests, tools_gateway, allowed_alice):
    stream = client_for(tools_gateway, allowed_alice).chat.completions.create(
        model=FAKE_MODEL,
        messages=[{"role": "user", "content": "list files"}],
        tools=[{"type": "bash"}],
        stream=True,
        extra_body=fake_call("bash", command="echo hi > f.txt; ls"),
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert tool_result(text)["stdout"] == "f.txt\n"
    assert not any(c.choices and c.choices[0].delta.tool_calls for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_the_stream_carries_progress_comments_not_content(
    engine_requests, tools_gateway, allowed_alice
):
    body = {
        "model": FAKE_MODEL,
        "messages": [{"role": "user", "content": "wait"}],
        "tools": [{"type": "python"}],
        "stream": True,
        **fake_call("python", code="print('done')"),
    }
    with httpx.stream(
        "POST",
        f"{tools_gateway.base_url}/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {allowed_alice.raw_key}"},
        timeout=30,
    ) as response:
        lines = [line for line in response.iter_lines() if line]
    assert ": tool python running" in lines
    assert lines[-1] == "data: [DONE]"


def test_a_tenant_not_allowed_the_tools_cannot_use_them(engine_requests, tools_gateway, alice, bob):
    tools_allow(tenant=bob.tenant, tools=["bash"])
    for tenant_key, tools in ((alice, [{"type": "python"}]), (bob, [{"type": "python"}])):
        with pytest.raises(openai.PermissionDeniedError) as err:
            client_for(tools_gateway, tenant_key).chat.completions.create(
                model=FAKE_MODEL,
                messages=[{"role": "user", "content": "hi"}],
                tools=tools,
                extra_body=fake_call("python", code="print(1)"),
            )
        assert err.value.code == "tools_not_allowed"
    assert engine_requests() == []
    assert not ToolRun.objects.exists()


def test_calls_of_the_clients_own_functions_go_back_to_the_client(
    engine_requests, tools_gateway, allowed_alice
):
    weather = {
        "type": "function",
        "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}},
    }
    reply = client_for(tools_gateway, allowed_alice).chat.completions.create(
        model=FAKE_MODEL,
        messages=[{"role": "user", "content": "weather?"}],
        tools=[{"type": "python"}, weather],
        extra_body=fake_call("get_weather", city="Oslo"),
    )
    call = reply.choices[0].message.tool_calls[0]
    assert (call.function.name, json.loads(call.function.arguments)) == (
        "get_weather",
        {"city": "Oslo"},
    )
    assert len(engine_requests()) == 1
    assert not ToolRun.objects.exists()


def test_the_loop_stops_after_the_maximum_rounds(engine_requests, tools_gateway, allowed_alice):
    reply = client_for(tools_gateway, allowed_alice).chat.completions.create(
        model=FAKE_MODEL,
        messages=[{"role": "user", "content": "loop"}],
        tools=[{"type": "python"}],
        extra_body=fake_call("python", rounds=10, code="print(1)"),
    )
    requests = engine_requests()
    assert len(requests) == 3  # TOOLS_MAX_ROUNDS
    assert "tools" not in requests[-1]["body"]  # the last round is offered no built-ins
    assert reply.choices[0].finish_reason == "tool_calls"
    assert len(wait_until(lambda: len(runs()) == 2 and runs())) == 2


def test_a_fork_bomb_through_the_loop_leaves_the_gateway_responsive(
    engine_requests, tools_gateway, allowed_alice
):
    import threading

    result: dict = {}

    def bomb() -> None:
        result["reply"] = client_for(tools_gateway, allowed_alice).chat.completions.create(
            model=FAKE_MODEL,
            messages=[{"role": "user", "content": "bomb"}],
            tools=[{"type": "bash"}],
            extra_body=fake_call("bash", command=":(){ :|:& };:; sleep 10"),
        )

    thread = threading.Thread(target=bomb)
    thread.start()
    time.sleep(0.5)
    slowest = 0.0
    while thread.is_alive():
        started = time.perf_counter()
        assert httpx.get(f"{tools_gateway.url}/health", timeout=5).status_code == 200
        slowest = max(slowest, time.perf_counter() - started)
        time.sleep(0.1)
    thread.join()
    assert slowest < 2.0, f"/health took {slowest:.2f} s during the fork bomb"
    # Stopped by the timeout, or earlier by its flood of "fork: retry" errors.
    assert set(tool_result(result["reply"].choices[0].message.content)["limits_hit"]) & {
        "timeout",
        "output",
    }
    assert wait_until(lambda: processes_of_uid(NOBODY) == 0, timeout=5)


def test_a_disconnect_kills_the_running_tool(engine_requests, tools_gateway, allowed_alice):
    marker = f"{time.time_ns() % 10**9}.321"
    body = {
        "model": FAKE_MODEL,
        "messages": [{"role": "user", "content": "sleep"}],
        "tools": [{"type": "bash"}],
        "stream": True,
        **fake_call("bash", command=f"sleep {marker}"),
    }
    with httpx.stream(
        "POST",
        f"{tools_gateway.base_url}/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {allowed_alice.raw_key}"},
        timeout=30,
    ) as response:
        lines = response.iter_lines()  # kept: a dropped iterator closes the response
        while not next(lines).startswith(": tool bash running"):
            pass
        wait_until(lambda: processes_with(marker), timeout=5)
    # Leaving the block closed the connection.
    wait_until(lambda: not processes_with(marker), timeout=1)  # before its 2 s timeout
    run = wait_until(lambda: runs(tenant=allowed_alice.tenant))[0]
    assert run.error.startswith("cancelled")


def test_the_session_stores_the_whole_exchange(engine_requests, tools_gateway, allowed_alice):
    from apps.sessions.models import Message

    client_for(tools_gateway, allowed_alice).chat.completions.create(
        model=FAKE_MODEL,
        messages=[{"role": "user", "content": "compute"}],
        tools=[{"type": "python"}],
        extra_headers={"X-Session-Id": "tools-1"},
        extra_body=fake_call("python", code="print(2 + 2)"),
    )
    stored = wait_until(
        lambda: list(Message.objects.filter(session__external_id="tools-1").order_by("position"))
    )
    assert [m.role for m in stored] == ["user", "assistant", "tool", "assistant"]
    assert stored[1].payload["tool_calls"][0]["function"]["name"] == "python"
    assert json.loads(stored[2].payload["content"])["stdout"] == "4\n"
    assert stored[3].payload["content"].startswith("Tool said: ")
    assert runs(tenant=allowed_alice.tenant)[0].session_id == "tools-1"


def test_the_model_searches_the_web_through_searxng(engine_requests, tools_gateway, allowed_alice):
    reply = client_for(tools_gateway, allowed_alice).chat.completions.create(
        model=FAKE_MODEL,
        messages=[{"role": "user", "content": "what is bubblewrap?"}],
        tools=[{"type": "web_search"}],
        extra_body=fake_call("web_search", query="bubblewrap sandbox"),
    )
    results = tool_result(reply.choices[0].message.content)["results"]
    assert results[0]["url"] == "https://example.org/0"
    assert results[0]["title"] == "Result 0 for bubblewrap sandbox"
    run = wait_until(lambda: runs(tenant=allowed_alice.tenant))[0]
    assert (run.tool, run.command_excerpt) == ("web_search", "bubblewrap sandbox")


def test_a_round_the_quota_cannot_cover_stops_the_loop(
    engine_requests, tools_gateway, allowed_alice
):
    from apps.quotas.services import quota_set

    # Round 1 (a short prompt, max_tokens 10) fits in 600 tokens; round 2 carries the
    # tool's 4 KB output (~800 words, which the fake engine's tokenizer counts) and cannot.
    quota_set(tenant=allowed_alice.tenant, tokens=600, period="day")
    with pytest.raises(openai.RateLimitError) as err:
        client_for(tools_gateway, allowed_alice).chat.completions.create(
            model=FAKE_MODEL,
            messages=[{"role": "user", "content": "print a lot"}],
            tools=[{"type": "python"}],
            max_tokens=10,
            extra_body=fake_call("python", code="print('word ' * 2000)"),
        )
    assert err.value.code == "insufficient_quota"
    assert len(engine_requests()) == 1
    assert wait_until(lambda: runs(tenant=allowed_alice.tenant))[0].exit_code is None  # cut
    logs = wait_until(
        lambda: (
            len(request_logs(tenant=allowed_alice.tenant)) == 2
            and request_logs(tenant=allowed_alice.tenant)
        )
    )
    assert [log.status_code for log in logs] == [200, 429]


def test_a_streamed_loop_sends_one_usage_chunk_when_asked(
    engine_requests, tools_gateway, allowed_alice
):
    chunks = list(
        client_for(tools_gateway, allowed_alice).chat.completions.create(
            model=FAKE_MODEL,
            messages=[{"role": "user", "content": "count"}],
            tools=[{"type": "python"}],
            stream=True,
            stream_options={"include_usage": True},
            extra_body=fake_call("python", code="print(3)"),
        )
    )
    usages = [c.usage for c in chunks if c.usage is not None]
    assert len(usages) == 1
    assert usages[0].completion_tokens == 4  # the final round's answer
    assert len(engine_requests()) == 2


def test_a_streamed_round_the_quota_cannot_cover_ends_with_an_error_event(
    engine_requests, tools_gateway, allowed_alice
):
    from apps.quotas.services import quota_set

    quota_set(tenant=allowed_alice.tenant, tokens=600, period="day")
    body = {
        "model": FAKE_MODEL,
        "messages": [{"role": "user", "content": "print a lot"}],
        "tools": [{"type": "python"}],
        "max_tokens": 10,
        "stream": True,
        **fake_call("python", code="print('word ' * 2000)"),
    }
    response = httpx.post(
        f"{tools_gateway.base_url}/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {allowed_alice.raw_key}"},
        timeout=30,
    )
    events = [line for line in response.text.splitlines() if line.startswith("data: ")]
    assert response.status_code == 200  # the stream had started with round 1
    assert json.loads(events[-2].removeprefix("data: "))["error"]["code"] == "insufficient_quota"
    assert events[-1] == "data: [DONE]"
    assert len(engine_requests()) == 1
