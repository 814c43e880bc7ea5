"""Rules and streamed chunks for the safety tests."""

from __future__ import annotations

from typing import Any

import openai

from apps.core.usage import Payer
from apps.safety.events import EventScope
from apps.safety.models import SafetyRule
from apps.safety.rules import Rule, Snapshot, rule_view
from apps.safety.stage import SafetyState


def rule(name: str, pattern: str, *, stage: str = "response", action: str = "block") -> Rule:
    """An unsaved rule as the snapshot holds it."""
    row = SafetyRule(name=name, pattern=pattern, stage=stage, action=action, pk=abs(hash(name)))
    built = rule_view(row)
    assert built is not None
    return built


def state_of(*rules: Rule) -> tuple[SafetyState, Snapshot]:
    snapshot = Snapshot(rules=rules)
    scope = EventScope(tenant_id=1, api_key_id=1, session_id="", request_id="r1")
    payer = Payer(tenant_id=1, tenant_slug="t", api_key_id=1)
    return SafetyState(snapshot=snapshot, scope=scope, payer=payer), snapshot


def chat_chunk(text: str | None = None, *, finish: str | None = None, role: bool = False) -> dict:
    delta: dict[str, Any] = {}
    if role:
        delta = {"role": "assistant", "content": ""}
    if text is not None:
        delta["content"] = text
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def delivered(chunks: list[dict]) -> str:
    return "".join(
        c["choices"][0]["delta"].get("content") or ""
        for c in chunks
        if c.get("choices") and "delta" in c["choices"][0]
    )


def read_until_error(stream) -> tuple[list, openai.APIError | None]:
    """The chunks of a stream, and the error event that ended it (the SDK raises it)."""
    chunks = []
    try:
        for chunk in stream:
            chunks.append(chunk)
    except openai.APIError as exc:
        return chunks, exc
    return chunks, None
