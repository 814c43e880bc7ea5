"""Tool commands: the checker the prompt stage puts in ctx.tool_checks (the tool loop
calls it before running a command), and tool_calls returned to the client when
SAFETY_CHECK_TOOL_CALLS is on."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from django.core.management import call_command

from apps.core.context import RequestContext
from apps.core.errors import ApiError
from apps.safety.events import event_writer
from apps.safety.rules import rule_cache
from apps.safety.stage import safety_prompt
from apps.tenants.auth import Principal
from tests.conftest import FAKE_MODEL, GatewayProcess, start_gateway

pytestmark = pytest.mark.django_db(transaction=True)

RM = '<tool_call>{"name": "bash", "arguments": {"command": "rm -rf / --no-preserve-root"}}</tool_call>'
LS = '<tool_call>{"name": "bash", "arguments": {"command": "ls -la"}}</tool_call>'
TOOLS = [{"type": "function", "function": {"name": "bash", "parameters": {"type": "object"}}}]


@pytest.fixture
def fresh_rules(settings) -> Iterator[None]:
    settings.SAFETY_RULES_CACHE_SECONDS = 0
    rule_cache.clear()
    yield
    rule_cache.clear()


def context_of(tenant_key) -> RequestContext:
    principal = Principal(
        key_id=tenant_key.api_key.pk,
        key_name="default",
        tenant_id=tenant_key.tenant.pk,
        tenant_slug=tenant_key.tenant.slug,
        tenant_active=True,
        expires_at=None,
        revoked=False,
        allowed_model_ids=None,
    )
    ctx = RequestContext(endpoint="chat.completions", principal=principal)
    ctx.payload = {"model": "m", "messages": [{"role": "user", "content": "clean up"}]}
    return ctx


async def test_it_refuses_a_dangerous_command_before_it_runs(fresh_rules, alice, bob):
    await _add("no-rm-rf", r"rm\s+-rf\s+/", "alice")
    ctx = context_of(alice)
    await safety_prompt(ctx)
    (check,) = ctx.tool_checks
    with pytest.raises(ApiError) as refused:
        await check("bash", "rm -rf / --no-preserve-root")
    assert (refused.value.code, "no-rm-rf" in refused.value.message) == ("content_filter", True)
    await check("bash", "ls -la")  # allowed: returns
    bobs = context_of(bob)
    await safety_prompt(bobs)
    assert bobs.tool_checks == []  # alice's rule is not bob's
    await event_writer.flush()  # written now, not by a task that outlives the test


async def _add(name: str, pattern: str, tenant: str) -> None:
    from channels.db import database_sync_to_async

    await database_sync_to_async(call_command)(
        "add_safety_rule", name, "--stage", "tool", "--regex", pattern, "--tenant", tenant
    )


@pytest.fixture
def checking_gateway(db, tmp_path: Path) -> Iterator[GatewayProcess]:
    from django.db import connection

    gateway = start_gateway(
        connection.settings_dict, tmp_path / "gw.log", env={"SAFETY_CHECK_TOOL_CALLS": "1"}
    )
    yield gateway
    gateway.stop()


def test_it_checks_tool_calls_returned_to_the_client_when_enabled(engine, checking_gateway, alice):
    call_command("add_safety_rule", "no-rm-rf", "--stage", "tool", "--regex", r"rm\s+-rf\s+/")
    client = openai.OpenAI(base_url=checking_gateway.base_url, api_key=alice.raw_key, max_retries=0)

    def ask(reply: str, **kwargs):
        return client.chat.completions.create(
            model=FAKE_MODEL,
            messages=[{"role": "user", "content": "clean up"}],
            tools=TOOLS,
            extra_body={"fake": {"reply": reply}},
            **kwargs,
        )

    refused = ask(RM).choices[0]
    assert (refused.finish_reason, refused.message.tool_calls) == ("content_filter", None)
    allowed = ask(LS).choices[0]
    assert allowed.message.tool_calls[0].function.name == "bash"
    streamed = httpx.post(
        f"{checking_gateway.base_url}/chat/completions",
        headers=alice.auth,
        json={
            "model": FAKE_MODEL,
            "stream": True,
            "tools": TOOLS,
            "messages": [{"role": "user", "content": "x"}],
            "fake": {"reply": RM},
        },
    ).text
    assert "rm -rf" not in streamed
    assert '"code":"content_filter"' in streamed


async def test_it_refuses_a_command_its_classifier_calls_unsafe(
    fresh_rules, settings, engine, fake_engine, alice
):
    from channels.db import database_sync_to_async

    from apps.engines.client import close_engine_session
    from apps.engines.services import engine_register_external

    settings.REGISTRY_CACHE_SECONDS = 0
    await database_sync_to_async(engine_register_external)(
        name="guard", base_url=fake_engine.url, models=["fake-guard"]
    )
    await database_sync_to_async(call_command)(
        "add_safety_rule", "guard-tools", "--stage", "tool", "--model", "fake-guard",
        "--categories", "S14",
    )  # fmt: skip
    ctx = context_of(alice)
    await safety_prompt(ctx)
    (check,) = ctx.tool_checks
    try:
        with pytest.raises(ApiError, match="guard-tools"):
            await check("python", "import os; os.system('fake-unsafe:S14')")
        await check("python", "print(sum(range(10)))")
        asked = [
            r["body"] for r in fake_engine.requests() if r["body"].get("model") == "fake-guard"
        ]
        assert (
            "Agent: Run this tool command: python: import os" in asked[0]["messages"][0]["content"]
        )
    finally:
        await close_engine_session()
        await event_writer.flush()
