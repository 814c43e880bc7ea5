"""The allow-list (command, admin) and the tool runs (admin, GET /api/tool-runs)."""

from __future__ import annotations

from io import StringIO

import pytest
from django.contrib.auth.models import User
from django.core.management import CommandError, call_command
from django.test import Client
from django.urls import reverse

from apps.tenants.services import api_key_revoke
from apps.tools.models import ToolAccess, ToolRun
from apps.tools.services import ToolRunRecord, tool_run_record, tools_allowed_for

pytestmark = pytest.mark.django_db


def allow_tools(*args: str) -> str:
    out = StringIO()
    call_command("allow_tools", *args, stdout=out)
    return out.getvalue().strip()


def run_for(tenant_key, *, tool: str = "python", command: str = "print(1)", **fields) -> ToolRun:
    return tool_run_record(
        record=ToolRunRecord(
            tenant_id=tenant_key.tenant.pk,
            api_key_id=tenant_key.api_key.pk,
            session_id=fields.pop("session_id", ""),
            tool=tool,
            command=command,
            **fields,
        )
    )


def test_it_allows_exactly_the_named_tools(alice):
    assert allow_tools("alice", "python", "bash") == "Tools allowed to tenant alice: python, bash."
    assert tools_allowed_for(tenant_id=alice.tenant.pk) == {"python", "bash"}
    assert allow_tools("alice", "web_search") == "Tools allowed to tenant alice: web_search."
    assert tools_allowed_for(tenant_id=alice.tenant.pk) == {"web_search"}
    assert allow_tools("alice", "--none") == "Tools allowed to tenant alice: none."
    assert tools_allowed_for(tenant_id=alice.tenant.pk) == frozenset()


def test_a_tenant_never_allowed_has_no_tools(alice):
    assert tools_allowed_for(tenant_id=alice.tenant.pk) == frozenset()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nobody", "python"], "No tenant with slug `nobody`."),
        (["alice", "perl"], "Unknown tool(s): perl (built-in: python, bash, web_search)."),
        (["alice"], "Name the tools to allow, or pass --none (not both)."),
        (["alice", "python", "--none"], "Name the tools to allow, or pass --none (not both)."),
    ],
)
def test_it_refuses_bad_input_in_one_line(alice, args, message):
    with pytest.raises(CommandError) as err:
        allow_tools(*args)
    assert str(err.value) == message
    assert not ToolAccess.objects.exists()


@pytest.fixture
def admin_client(db) -> Client:
    client = Client()
    client.force_login(User.objects.create_superuser("root", "root@example.com", "pw"))
    return client


def test_the_admin_lists_tool_runs_with_filters_and_the_sandbox(admin_client, alice, bob):
    run_for(alice, command="print('alice-run')", exit_code=0, duration_ms=12)
    run_for(bob, tool="bash", command="rm -rf /", blocked_by_safety=True, blocked_reason="no")
    url = reverse("admin:tools_toolrun_changelist")
    page = admin_client.get(url).content.decode()
    assert "alice-run" in page
    assert "rm -rf /" in page
    assert "Tools sandbox: subprocess (BwrapSandbox)" in page
    blocked = admin_client.get(url, {"blocked_by_safety__exact": "1"}).content.decode()
    assert "rm -rf /" in blocked
    assert "alice-run" not in blocked
    by_tool = admin_client.get(url, {"tool__exact": "python"}).content.decode()
    assert "alice-run" in by_tool
    assert "rm -rf /" not in by_tool
    assert admin_client.get(reverse("admin:tools_toolrun_add")).status_code == 403


def test_the_admin_warns_of_the_rlimits_only_mode(admin_client, settings):
    settings.TOOLS_BWRAP = "/nonexistent/bwrap"
    settings.TOOLS_SANDBOX_RLIMITS_ONLY = True
    page = admin_client.get(reverse("admin:tools_toolaccess_changelist")).content.decode()
    assert "rlimits-only (TOOLS_SANDBOX_RLIMITS_ONLY=1): no namespace isolation, weaker" in page


def test_the_admin_edits_the_allow_list(admin_client, alice):
    response = admin_client.post(
        reverse("admin:tools_toolaccess_add"),
        {"tenant": alice.tenant.pk, "python": "on", "web_search": "on"},
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    assert tools_allowed_for(tenant_id=alice.tenant.pk) == {"python", "web_search"}


def test_a_tenant_reads_only_its_own_tool_runs(alice, bob):
    run_for(alice, command="print('mine')", exit_code=0, limits_hit=["timeout"], timed_out=True)
    run_for(bob, command="print('bobs')")
    body = Client().get("/api/tool-runs", headers={"authorization": f"Bearer {alice.raw_key}"})
    assert body.status_code == 200
    data = body.json()["data"]
    assert [run["command_excerpt"] for run in data] == ["print('mine')"]
    assert data[0]["limits_hit"] == ["timeout"]
    assert data[0]["api_key"] == "default"
    other = Client().get("/api/tool-runs", headers={"authorization": f"Bearer {bob.raw_key}"})
    assert [run["command_excerpt"] for run in other.json()["data"]] == ["print('bobs')"]


def test_the_tool_runs_page_and_filter(alice):
    for i in range(3):
        run_for(alice, command=f"print({i})")
    run_for(alice, tool="bash", command="ls")
    auth = {"authorization": f"Bearer {alice.raw_key}"}
    first = Client().get("/api/tool-runs", {"limit": 2, "tool": "python"}, headers=auth).json()
    assert [r["command_excerpt"] for r in first["data"]] == ["print(2)", "print(1)"]
    assert first["has_more"] is True
    rest = (
        Client()
        .get("/api/tool-runs", {"limit": 2, "offset": 2, "tool": "python"}, headers=auth)
        .json()
    )
    assert [r["command_excerpt"] for r in rest["data"]] == ["print(0)"]
    assert not rest["has_more"]


@pytest.mark.parametrize("query", [{"limit": 0}, {"limit": "x"}, {"tool": "perl"}])
def test_bad_queries_get_openai_shaped_400s(alice, query):
    response = Client().get(
        "/api/tool-runs", query, headers={"authorization": f"Bearer {alice.raw_key}"}
    )
    assert response.status_code == 400
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_a_revoked_key_reads_nothing(alice):
    run_for(alice)
    api_key_revoke(api_key=alice.api_key)
    response = Client().get("/api/tool-runs", headers={"authorization": f"Bearer {alice.raw_key}"})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
