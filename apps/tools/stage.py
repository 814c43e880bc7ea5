"""Pipeline stage: built-in tools (`{"type": "python"}`, `bash`, `web_search` among a
request's `tools`) become the function schemas the model sees, for tenants allowed them.

The loop that runs the calls (apps/proxy/tool_loop.py) finds what was offered in
`ctx.extras["tools"]` (a BuiltInTools)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.conf import settings

from apps.core.context import RequestContext
from apps.core.errors import ApiError
from apps.tools.models import BUILT_IN_TOOLS, WEB_SEARCH
from apps.tools.sandbox.base import Sandbox, SandboxUnavailable
from apps.tools.sandbox.config import sandbox_from_settings
from apps.tools.schemas import SCHEMAS


@dataclass(frozen=True, slots=True)
class BuiltInTools:
    names: frozenset[str]
    sandbox: Sandbox | None  # None when only web_search is offered


def requested_built_ins(tools: Any) -> list[str]:
    if not isinstance(tools, list):
        return []
    return [t["type"] for t in tools if isinstance(t, dict) and t.get("type") in BUILT_IN_TOOLS]


async def built_in_tools(ctx: RequestContext) -> None:
    """Replace the built-in tool entries with their schemas (403 `tools_not_allowed` for a
    tenant the operator did not allow them)."""
    names = requested_built_ins(ctx.payload.get("tools"))
    if not names:
        return
    assert ctx.principal is not None
    allowed = ctx.principal.attachments.get("tools", frozenset())
    refused = sorted(set(names) - allowed)
    if refused:
        raise ApiError(
            403,
            f"This tenant may not use the built-in tool(s) {', '.join(refused)}; "
            "an operator allows them (manage.py allow_tools).",
            type="permission_error",
            param="tools",
            code="tools_not_allowed",
        )
    _check_names_free(ctx.payload["tools"], names)
    ctx.payload["tools"] = [
        SCHEMAS[t["type"]] if t.get("type") in BUILT_IN_TOOLS else t
        for t in ctx.payload["tools"]
        if isinstance(t, dict)
    ]
    ctx.payload_changed = True
    ctx.extras["tools"] = BuiltInTools(names=frozenset(names), sandbox=_sandbox_for(names))


def _check_names_free(tools: list, names: list[str]) -> None:
    """A client function of the same name would make a model's call ambiguous."""
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(function, dict) and function.get("name") in names:
            raise ApiError(
                400,
                f"A function named `{function['name']}` clashes with the built-in tool.",
                param="tools",
                code="invalid_value",
            )


def _sandbox_for(names: list[str]) -> Sandbox | None:
    if WEB_SEARCH in names and not settings.TOOLS_SEARXNG_URL:
        raise ApiError(
            400,
            "web_search is not configured on this gateway (TOOLS_SEARXNG_URL).",
            param="tools",
            code="tool_unavailable",
        )
    if not set(names) - {WEB_SEARCH}:
        return None
    try:
        return sandbox_from_settings()
    except SandboxUnavailable as exc:
        raise ApiError(503, str(exc), type="api_error", code="sandbox_unavailable") from None
