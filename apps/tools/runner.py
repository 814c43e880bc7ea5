"""Running one built-in tool call for the tool loop: parse its arguments, ask every tool
check (the safety stage's rules) first, run it (sandbox or search), record a ToolRun, and
give the text the model gets back as the tool result."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import orjson
from channels.db import database_sync_to_async

from apps.core.context import ToolCheck
from apps.core.errors import ApiError
from apps.tools.models import WEB_SEARCH
from apps.tools.sandbox.base import RunResult
from apps.tools.sandbox.config import limits_from_settings, tool_argv
from apps.tools.schemas import ARGUMENT
from apps.tools.services import ToolRunRecord, tool_run_record
from apps.tools.stage import BuiltInTools
from apps.tools.web_search import SearchFailed, web_search

logger = logging.getLogger(__name__)
_record = database_sync_to_async(tool_run_record, thread_sensitive=False)
_recording: set[asyncio.Task] = set()


@dataclass(frozen=True, slots=True)
class ToolCaller:
    tenant_id: int
    api_key_id: int | None
    session_id: str


async def tool_call_run(
    *, name: str, arguments: str, tools: BuiltInTools, checks: list[ToolCheck], caller: ToolCaller
) -> str:
    """The tool result for the model (a JSON text). Cancellation kills a running command."""
    record = ToolRunRecord(
        tenant_id=caller.tenant_id,
        api_key_id=caller.api_key_id,
        session_id=caller.session_id,
        tool=name,
        command=arguments,
    )
    try:
        source = _argument(name, arguments)
        record.command = source
        for check in checks:
            await check(name, source)
        content = await _run(name, source, tools, record)
    except ApiError as refusal:
        record.blocked_by_safety, record.blocked_reason = True, refusal.message
        content = _json({"error": f"Refused by the platform's rules: {refusal.message}"})
    except _BadCall as bad:
        record.error = str(bad)
        content = _json({"error": str(bad)})
    except asyncio.CancelledError:
        record.error = "cancelled: the client left (the command was killed)"
        raise
    finally:
        _record_in_background(record)
    return content


class _BadCall(Exception):
    pass


def _argument(name: str, arguments: str) -> str:
    try:
        parsed = orjson.loads(arguments or "{}")
    except orjson.JSONDecodeError:
        raise _BadCall(f"The arguments of `{name}` are not JSON.") from None
    value = parsed.get(ARGUMENT[name]) if isinstance(parsed, dict) else None
    if not isinstance(value, str) or not value.strip():
        raise _BadCall(f"`{name}` needs a string argument `{ARGUMENT[name]}`.")
    return value


async def _run(name: str, source: str, tools: BuiltInTools, record: ToolRunRecord) -> str:
    if name == WEB_SEARCH:
        try:
            return _json({"results": await web_search(query=source)})
        except SearchFailed as exc:
            raise _BadCall(f"web_search failed: {exc}") from None
    assert tools.sandbox is not None
    record.backend = tools.sandbox.name
    result = await tools.sandbox.run(tool_argv(name, source), limits=limits_from_settings())
    _fill(record, result)
    return _json(result_for_model(result))


def result_for_model(result: RunResult) -> dict:
    out = {"exit_code": result.exit_code, "stdout": result.stdout, "stderr": result.stderr}
    if result.limits_hit:
        out["limits_hit"] = result.limits_hit
    if result.output_truncated:
        out["note"] = "output truncated: the program was stopped at the output limit"
    if result.files:
        out["files"] = [{"name": f.name, "size": f.size} for f in result.files]
    return out


def _fill(record: ToolRunRecord, result: RunResult) -> None:
    record.exit_code = result.exit_code
    record.duration_ms = result.duration_ms
    record.timed_out = result.timed_out
    record.limits_hit = list(result.limits_hit)


def _json(value: dict) -> str:
    return orjson.dumps(value).decode()


def _record_in_background(record: ToolRunRecord) -> None:
    """Written off the request (and still when the client left mid-run)."""
    task = asyncio.get_running_loop().create_task(_record_logged(record))
    _recording.add(task)
    task.add_done_callback(_recording.discard)


async def _record_logged(record: ToolRunRecord) -> None:
    try:
        await _record(record=record)
    except Exception:
        logger.exception("could not record a %s tool run", record.tool)


async def tool_runs_drain() -> None:
    """Wait for the tool-run records in flight (shutdown, tests)."""
    while _recording:
        await asyncio.gather(*list(_recording), return_exceptions=True)
