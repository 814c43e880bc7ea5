"""Assembling what a session sends the engine (pure functions): the system prompt that
applies, and the stored history trimmed to a token budget without parsing it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from apps.core.context import NO_HISTORY, SYSTEM_ROLES, SessionHistory

__all__ = ["SYSTEM_ROLES", "StoredHistory", "history_trim", "prompt_head", "system_prompt_resolve"]


@dataclass(frozen=True, slots=True)
class StoredHistory:
    """A session's history as the open returns it (migration 0007): the payloads' JSON
    joined by commas (UTF-8), and per unit (droppable turn) its first byte in `json`, its
    token cost and its number of messages.

    A unit is a user message with the replies and tool results after it (or whatever
    precedes the first user message). Dropping whole units keeps user/assistant
    alternation (chat templates such as Gemma's refuse anything else) and never leaves an
    orphan tool result first."""

    json: bytes = b""
    unit_offsets: tuple[int, ...] = ()
    unit_tokens: tuple[int, ...] = ()
    unit_messages: tuple[int, ...] = ()
    media: bool = False  # some message has non-text content parts

    def kept(self, dropped_units: int = 0) -> SessionHistory:
        """The history without its `dropped_units` oldest units, as the engine gets it."""
        if dropped_units >= len(self.unit_offsets):
            return NO_HISTORY
        return SessionHistory(
            json=self.json[self.unit_offsets[dropped_units] :],
            messages=sum(self.unit_messages[dropped_units:]),
            tokens=sum(self.unit_tokens[dropped_units:]),
            media=self.media,
        )


def system_prompt_resolve(
    *, tenant_system_prompt: str, variant_system_prompt: str, session_system_prompt: str = ""
) -> str:
    """The most specific non-empty prompt: session, then model variant, then tenant."""
    return session_system_prompt or variant_system_prompt or tenant_system_prompt or ""


def prompt_head(system_prompt: str, new_messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """[the system prompt as a message], unless there is none or the client sent its own
    system (or developer) message, which wins."""
    if not system_prompt or any(m.get("role") in SYSTEM_ROLES for m in new_messages):
        return []
    return [{"role": "system", "content": system_prompt}]


def history_trim(
    history: StoredHistory, *, fixed_tokens: int, budget_tokens: int | None
) -> SessionHistory:
    """The history to send with `fixed_tokens` of other messages (the system prompt and the
    new messages, never dropped): with a budget, the oldest units go first until everything
    fits, all of them if the rest alone exceeds it (the engine's refusal is then the honest
    answer)."""
    dropped = 0
    if budget_tokens is not None:
        costs = history.unit_tokens
        total = fixed_tokens + sum(costs)
        while total > budget_tokens and dropped < len(costs):
            total -= costs[dropped]
            dropped += 1
    return history.kept(dropped)
