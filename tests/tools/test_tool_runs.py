"""Running built-in tool calls: the tool checks come first, web_search asks SearxNG, and the
loop in-process with a safety check appended (what the safety stage does)."""

from __future__ import annotations

import json

import orjson
import pytest
from channels.db import database_sync_to_async

from apps.core.context import RequestContext
from apps.core.errors import ApiError
from apps.engines.client import close_engine_session
from apps.proxy.pipeline import CHAT_COMPLETIONS, Pipeline, run_pipeline, settle
from apps.proxy.responder import Responder
from apps.tools.models import ToolRun
from apps.tools.runner import ToolCaller, tool_call_run, tool_runs_drain
from apps.tools.sandbox.bwrap import BwrapSandbox
from apps.tools.services import tools_allow
from apps.tools.stage import BuiltInTools
from tests.conftest import FAKE_MODEL

pytestmark = pytest.mark.django_db(transaction=True)
db = database_sync_to_async


async def refuse_rm_rf(tool: str, command: str) -> None:
    if "rm -rf /" in command:
        raise ApiError(403, "rm -rf / is not allowed here.", code="unsafe_command")


@pytest.fixture
def sandbox_never_runs(monkeypatch) -> list:
    calls: list = []

    async def run(self, argv, *, limits):
        calls.append(argv)
        raise AssertionError("the sandbox ran a refused command")

    monkeypatch.setattr(BwrapSandbox, "run", run)
    return calls


def caller_of(tenant_key) -> ToolCaller:
    return ToolCaller(
        tenant_id=tenant_key.tenant.pk, api_key_id=tenant_key.api_key.pk, session_id=""
    )


async def test_a_check_refuses_before_anything_runs(alice, sandbox_never_runs):
    content = await tool_call_run(
        name="bash",
        arguments=json.dumps({"command": "rm -rf / --no-preserve-root"}),
        tools=BuiltInTools(names=frozenset({"bash"}), sandbox=BwrapSandbox()),
        checks=[refuse_rm_rf],
        caller=caller_of(alice),
    )
    await tool_runs_drain()
    assert json.loads(content) == {
        "error": "Refused by the platform's rules: rm -rf / is not allowed here."
    }
    assert sandbox_never_runs == []
    run = await db(ToolRun.objects.get)()
    assert run.blocked_by_safety
    assert run.blocked_reason == "rm -rf / is not allowed here."
    assert run.exit_code is None
    assert run.command_excerpt == "rm -rf / --no-preserve-root"


@pytest.mark.parametrize(
    ("arguments", "error"),
    [
        ("not json", "The arguments of `python` are not JSON."),
        ('{"source": "print(1)"}', "`python` needs a string argument `code`."),
        ('{"code": 42}', "`python` needs a string argument `code`."),
    ],
)
async def test_bad_arguments_come_back_to_the_model_as_an_error(
    alice, sandbox_never_runs, arguments, error
):
    content = await tool_call_run(
        name="python",
        arguments=arguments,
        tools=BuiltInTools(names=frozenset({"python"}), sandbox=BwrapSandbox()),
        checks=[],
        caller=caller_of(alice),
    )
    await tool_runs_drain()
    assert json.loads(content) == {"error": error}
    assert (await db(ToolRun.objects.get)()).error == error


async def test_web_search_returns_titles_urls_and_snippets(alice, settings, searx_url):
    settings.TOOLS_SEARXNG_URL = searx_url
    settings.TOOLS_SEARCH_RESULTS = 3
    content = await tool_call_run(
        name="web_search",
        arguments=json.dumps({"query": "bubblewrap"}),
        tools=BuiltInTools(names=frozenset({"web_search"}), sandbox=None),
        checks=[],
        caller=caller_of(alice),
    )
    results = json.loads(content)["results"]
    assert results[0] == {
        "title": "Result 0 for bubblewrap",
        "url": "https://example.org/0",
        "snippet": "about bubblewrap",
    }
    assert len(results) == 3
    await tool_runs_drain()


async def test_web_search_down_is_an_error_for_the_model(alice, settings):
    settings.TOOLS_SEARXNG_URL = "http://127.0.0.1:9/search"  # nothing listens on port 9
    content = await tool_call_run(
        name="web_search",
        arguments=json.dumps({"query": "x"}),
        tools=BuiltInTools(names=frozenset({"web_search"}), sandbox=None),
        checks=[],
        caller=caller_of(alice),
    )
    await tool_runs_drain()
    assert json.loads(content)["error"].startswith("web_search failed: the search service failed")


class Recorder:
    def __init__(self) -> None:
        self.status = 0
        self.body = b""

    async def send_headers(self, *, status: int = 200, headers=None) -> None:
        self.status = status

    async def send_body(self, body: bytes, *, more_body: bool = False) -> None:
        self.body += body


async def chat_in_process(tenant_key, payload: dict, *stages) -> Recorder:
    ctx = RequestContext(
        endpoint="chat.completions",
        headers=[(b"authorization", f"Bearer {tenant_key.raw_key}".encode())],
        body=orjson.dumps(payload),
    )
    pipeline = Pipeline(
        endpoint=CHAT_COMPLETIONS.endpoint,
        upstream_path=CHAT_COMPLETIONS.upstream_path,
        stages=(*CHAT_COMPLETIONS.stages, *stages),
    )
    recorder = Recorder()
    try:
        await run_pipeline(
            pipeline,
            ctx,
            Responder(send_headers=recorder.send_headers, send_body=recorder.send_body),
        )
    finally:
        settle(ctx)
        await tool_runs_drain()
        await close_engine_session()  # this test's event loop ends with it
    return recorder


async def test_the_loop_asks_the_tool_checks_and_the_model_gets_the_refusal(
    engine, alice, sandbox_never_runs
):
    await db(tools_allow)(tenant=alice.tenant, tools=["bash"])

    async def add_check(ctx: RequestContext) -> None:
        ctx.tool_checks.append(refuse_rm_rf)

    payload = {
        "model": FAKE_MODEL,
        "messages": [{"role": "user", "content": "clean up"}],
        "tools": [{"type": "bash"}],
        "fake": {"tool_call": "bash", "tool_args": json.dumps({"command": "rm -rf /"})},
    }
    recorder = await chat_in_process(alice, payload, add_check)
    assert recorder.status == 200
    reply = orjson.loads(recorder.body)["choices"][0]["message"]["content"]
    assert json.loads(reply.removeprefix("Tool said: ")) == {
        "error": "Refused by the platform's rules: rm -rf / is not allowed here."
    }
    assert sandbox_never_runs == []
    run = await db(ToolRun.objects.get)()
    assert run.blocked_by_safety
    assert run.tool == "bash"


async def test_web_search_is_refused_when_not_configured(engine, alice, settings):
    settings.TOOLS_SEARXNG_URL = ""
    await db(tools_allow)(tenant=alice.tenant, tools=["web_search"])
    payload = {
        "model": FAKE_MODEL,
        "messages": [{"role": "user", "content": "search"}],
        "tools": [{"type": "web_search"}],
    }
    with pytest.raises(ApiError) as err:
        await chat_in_process(alice, payload)
    assert (err.value.status, err.value.code) == (400, "tool_unavailable")


async def test_a_clashing_function_name_is_refused(engine, alice):
    await db(tools_allow)(tenant=alice.tenant, tools=["python"])
    clash = {"type": "function", "function": {"name": "python", "parameters": {}}}
    payload = {
        "model": FAKE_MODEL,
        "messages": [{"role": "user", "content": "x"}],
        "tools": [{"type": "python"}, clash],
    }
    with pytest.raises(ApiError) as err:
        await chat_in_process(alice, payload)
    assert (err.value.status, err.value.param) == (400, "tools")


async def test_a_missing_sandbox_is_a_503_naming_the_fix(engine, alice, settings):
    settings.TOOLS_BWRAP = "/nonexistent/bwrap"
    await db(tools_allow)(tenant=alice.tenant, tools=["python"])
    payload = {
        "model": FAKE_MODEL,
        "messages": [{"role": "user", "content": "x"}],
        "tools": [{"type": "python"}],
    }
    with pytest.raises(ApiError) as err:
        await chat_in_process(alice, payload)
    assert (err.value.status, err.value.code) == (503, "sandbox_unavailable")
    assert "apt-get install bubblewrap" in err.value.message
