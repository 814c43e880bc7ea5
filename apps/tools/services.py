"""Writes of the tools app: the allow-list and tool-run records."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from django.db import transaction

from apps.tenants.models import Tenant
from apps.tools.models import BUILT_IN_TOOLS, ToolAccess, ToolRun

EXCERPT_CHARS = 500


def tools_allow(*, tenant: Tenant, tools: Iterable[str]) -> ToolAccess:
    """Allow exactly `tools` (empty: none) to `tenant`."""
    wanted = set(tools)
    unknown = wanted - set(BUILT_IN_TOOLS)
    if unknown:
        raise ValueError(
            f"Unknown tool(s): {', '.join(sorted(unknown))} (built-in: {', '.join(BUILT_IN_TOOLS)})."
        )
    with transaction.atomic():
        access, _ = ToolAccess.objects.select_for_update().get_or_create(tenant=tenant)
        for name in BUILT_IN_TOOLS:
            setattr(access, name, name in wanted)
        access.save()
    return access


def tools_allowed_for(*, tenant_id: int) -> frozenset[str]:
    access = ToolAccess.objects.filter(tenant_id=tenant_id).first()
    return frozenset(access.allowed()) if access else frozenset()


@dataclass(slots=True)
class ToolRunRecord:
    tenant_id: int
    api_key_id: int | None
    session_id: str
    tool: str
    command: str
    backend: str = ""
    exit_code: int | None = None
    duration_ms: float = 0.0
    timed_out: bool = False
    limits_hit: list[str] = field(default_factory=list)
    blocked_by_safety: bool = False
    blocked_reason: str = ""
    error: str = ""


def tool_run_record(*, record: ToolRunRecord) -> ToolRun:
    return ToolRun.objects.create(
        tenant_id=record.tenant_id,
        api_key_id=record.api_key_id,
        session_id=record.session_id or "",
        tool=record.tool,
        backend=record.backend,
        command_excerpt=record.command[:EXCERPT_CHARS],
        exit_code=record.exit_code,
        duration_ms=record.duration_ms,
        timed_out=record.timed_out,
        limits_hit=list(record.limits_hit),
        blocked_by_safety=record.blocked_by_safety,
        blocked_reason=record.blocked_reason[:EXCERPT_CHARS],
        error=record.error[:EXCERPT_CHARS],
    )
