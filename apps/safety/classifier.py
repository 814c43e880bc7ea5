"""Classifier (model) rules: placeholder until the Llama Guard client lands."""

from __future__ import annotations

from typing import Any

from apps.core.context import RequestContext
from apps.safety.checks import Finding


def conversation_of(payload: dict[str, Any]) -> list[dict[str, str]]:
    return []


async def classify_rules(
    rules: Any, *, conversation: Any, tool_command: str | None
) -> list[Finding]:
    return []


def precheck_verdicts(ctx: RequestContext, index: int) -> list[Finding]:
    return []


class StreamClassifier:
    @classmethod
    def of(cls, ctx: RequestContext, state: Any, rules: Any) -> None:
        return None
