"""The tool loop rides over engine faults as a plain request does: each round's engine call
is retried (another replica, backoff) or served by a fallback while nothing of that round
reached the client. Through a real gateway and the fake engine, whose `fail_round` knob
fails one round's call a given number of times."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from apps.engines.services import engine_register_external, served_model_set_fallbacks
from apps.tools.services import tools_allow
from tests.conftest import FAKE_MODEL, GatewayProcess, TenantKey, free_port, start_gateway
from tests.tools.conftest import TOOLS_ENV
from tests.tools.test_tool_loop_e2e import client_for, fake_call, tool_result

pytestmark = pytest.mark.django_db(transaction=True)

RETRIES = 2


@pytest.fixture(scope="module")
def retrying(django_db_setup, django_db_blocker, tmp_path_factory) -> Iterator[GatewayProcess]:
    """A gateway of its own: quick retries, and circuits that these failures never open
    (breakers live in its memory, and would refuse the next tests' engines)."""
    from django.db import connection

    env = {
        **TOOLS_ENV,
        "ENGINE_RETRIES": str(RETRIES),
        "ENGINE_RETRY_BACKOFF_SECONDS": "0.05",
        "CIRCUIT_BREAKER_FAILURES": "100",
    }
    log_path = tmp_path_factory.mktemp("tool-retries") / "gateway.log"
    gateway = start_gateway(connection.settings_dict, log_path, env=env)
    yield gateway
    gateway.stop()
    time.sleep(0.15)  # its batched request logs land before the tables are flushed


@pytest.fixture
def allowed(alice: TenantKey) -> TenantKey:
    tools_allow(tenant=alice.tenant, tools=["python"])
    return alice


@pytest.fixture
def chat_requests(engine, fake_engine):
    """The chat requests the fake engine received in this test (`engine` reset it)."""
    return lambda: [r for r in fake_engine.requests() if r.get("path") == "/v1/chat/completions"]


def flaky_python(code: str, *, fail_times: int = 1) -> dict:
    """The model calls python once; its second round's call fails `fail_times` times."""
    body = fake_call("python", code=code)
    body["fake"].update(fail_round=2, fail_times=fail_times)
    return body


def question(text: str) -> list[dict]:
    # Unique per test: the fake engine counts a round's failures by its conversation.
    return [{"role": "user", "content": f"{text} ({time.time_ns()})"}]


def test_it_answers_when_the_second_rounds_engine_call_fails_once(retrying, allowed, chat_requests):
    reply = client_for(retrying, allowed).chat.completions.create(
        model=FAKE_MODEL,
        messages=question("what is 6 times 7?"),
        tools=[{"type": "python"}],
        extra_body=flaky_python("print(6 * 7)"),
    )
    assert tool_result(reply.choices[0].message.content)["stdout"] == "42\n"
    first, failed, retried = chat_requests()
    assert failed["body"]["messages"] == retried["body"]["messages"]  # the round, again
    assert retried["body"]["messages"][-1]["role"] == "tool"
    assert len(first["body"]["messages"]) == 1


def test_it_streams_the_answer_when_the_second_rounds_engine_call_fails_once(
    retrying, allowed, chat_requests
):
    chunks = list(
        client_for(retrying, allowed).chat.completions.create(
            model=FAKE_MODEL,
            messages=question("what is 2 plus 3?"),
            tools=[{"type": "python"}],
            stream=True,
            extra_body=flaky_python("print(2 + 3)"),
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert tool_result(text)["stdout"] == "5\n"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert len(chat_requests()) == 3


def test_it_relays_the_engines_error_when_a_rounds_retries_are_spent(
    retrying, allowed, chat_requests
):
    with pytest.raises(openai.InternalServerError) as err:
        client_for(retrying, allowed).chat.completions.create(
            model=FAKE_MODEL,
            messages=question("what is 1 plus 1?"),
            tools=[{"type": "python"}],
            extra_body=flaky_python("print(1 + 1)", fail_times=10),
        )
    assert err.value.status_code == 503
    assert err.value.body["message"] == "fake error 503"
    assert len(chat_requests()) == 1 + 1 + RETRIES


def test_it_ends_the_stream_with_an_error_event_when_a_rounds_retries_are_spent(
    retrying, allowed, chat_requests
):
    body = {
        "model": FAKE_MODEL,
        "messages": question("what is 3 plus 3?"),
        "tools": [{"type": "python"}],
        "stream": True,
        **flaky_python("print(3 + 3)", fail_times=10),
    }
    response = httpx.post(
        f"{retrying.base_url}/chat/completions", json=body, headers=allowed.auth, timeout=30
    )
    events = [line for line in response.text.splitlines() if line.startswith("data: ")]
    assert response.status_code == 200  # the stream had started with round 1
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["message"].endswith("fake error 503")
    assert events[-1] == "data: [DONE]"
    assert len(chat_requests()) == 1 + 1 + RETRIES


def test_it_retries_each_round_on_the_other_replica_when_the_first_is_down(
    retrying, allowed, chat_requests, fake_engine
):
    dead = f"http://127.0.0.1:{free_port()}"
    engine_register_external(
        name="half-down", base_url=dead, extra_base_urls=[fake_engine.url], models=["half-down"]
    )
    reply = client_for(retrying, allowed).chat.completions.create(
        model="half-down",
        messages=question("what is 4 times 4?"),
        tools=[{"type": "python"}],
        extra_body=fake_call("python", code="print(4 * 4)"),
    )
    assert tool_result(reply.choices[0].message.content)["stdout"] == "16\n"
    assert len(chat_requests()) == 2  # both rounds served by the replica that is up


def test_it_lets_a_fallback_serve_a_round_the_requested_model_cannot(
    retrying, allowed, chat_requests, fake_engine
):
    engine_register_external(name="tool-primary", base_url=fake_engine.url, models=["primary"])
    served_model_set_fallbacks(name="primary", fallbacks=[FAKE_MODEL])
    raw = client_for(retrying, allowed).chat.completions.with_raw_response.create(
        model="primary",
        messages=question("what is 5 times 5?"),
        tools=[{"type": "python"}],
        # The primary's attempts at round 2 (the first and its retries) all fail.
        extra_body=flaky_python("print(5 * 5)", fail_times=1 + RETRIES),
    )
    reply = raw.parse()
    assert tool_result(reply.choices[0].message.content)["stdout"] == "25\n"
    assert (raw.headers["x-gateway-model"], reply.model) == (FAKE_MODEL, FAKE_MODEL)
    models = [r["body"]["model"] for r in chat_requests()]
    assert models == ["primary"] * (2 + RETRIES) + [FAKE_MODEL]
