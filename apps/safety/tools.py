"""Tool-stage checks: commands the tool loop is about to run (ctx.tool_checks), and the
tool_calls a model returns to the client when SAFETY_CHECK_TOOL_CALLS is on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from apps.core.errors import ApiError
from apps.safety.checks import regex_check
from apps.safety.classifier import classify_rules
from apps.safety.models import Action, Stage
from apps.safety.rules import StageRules

if TYPE_CHECKING:
    from apps.safety.stage import SafetyState


def tool_refusal(rule_name: str) -> ApiError:
    return ApiError(
        400,
        f"This tool command was refused by the safety rule `{rule_name}`.",
        code="content_filter",
    )


def command_text(tool_name: str, command: str) -> str:
    return f"{tool_name}: {command}" if tool_name else command


@dataclass
class ToolChecker:
    """A ToolCheck (apps/core/context.py): raise ApiError to refuse the command."""

    state: SafetyState
    rules: StageRules

    async def __call__(self, tool_name: str, command: str) -> None:
        if self.rules.regex:
            verdict = regex_check(self.rules, command)
            for finding in verdict.findings:
                self.state.record(Stage.TOOL, finding)
            if verdict.blocked is not None:
                raise tool_refusal(verdict.blocked.rule.name)
        if self.rules.model:
            findings = await classify_rules(
                self.rules.model,
                conversation=None,
                tool_command=command_text(tool_name, command),
                payer=self.state.payer,
            )
            for finding in findings:
                self.state.record(Stage.TOOL, finding)
            for finding in findings:
                if finding.action == Action.BLOCK:
                    raise tool_refusal(finding.rule.name)


def merged_tool_calls(deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Streamed tool-call deltas merged into whole calls (by index), as one delta."""
    calls: dict[int, dict[str, Any]] = {}
    for delta in deltas:
        index = int(delta.get("index", 0))
        call = calls.setdefault(
            index,
            {
                "index": index,
                "id": "",
                "type": "function",
                "function": {"name": "", "arguments": ""},
            },
        )
        call["id"] = delta.get("id") or call["id"]
        function = delta.get("function") or {}
        call["function"]["name"] += function.get("name") or ""
        call["function"]["arguments"] += function.get("arguments") or ""
    return [calls[i] for i in sorted(calls)]


def tool_calls_blocked(state: SafetyState, rules: StageRules, tool_calls: Any) -> bool:
    """Regex tool rules over each returned call (name and arguments); True on a block."""
    if not isinstance(tool_calls, list) or not rules.regex:
        return False
    for call in tool_calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            continue
        text = command_text(str(function.get("name") or ""), str(function.get("arguments") or ""))
        verdict = regex_check(rules, text)
        for finding in verdict.findings:
            state.record(Stage.TOOL, finding)
        if verdict.blocked is not None:
            return True
    return False
