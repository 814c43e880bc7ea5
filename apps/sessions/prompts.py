"""Assembling the messages sent to the engine from a session's history (pure functions)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# "developer" is OpenAI's newer name for the system role.
SYSTEM_ROLES = frozenset({"system", "developer"})


@dataclass(frozen=True)
class StoredMessage:
    payload: dict[str, Any]
    tokens: int | None  # None: not counted when stored; count it when needed


def system_prompt_resolve(
    *, tenant_system_prompt: str, variant_system_prompt: str, session_system_prompt: str = ""
) -> str:
    """The most specific non-empty prompt: session, then model variant, then tenant."""
    return session_system_prompt or variant_system_prompt or tenant_system_prompt or ""


def _units(history: list[StoredMessage]) -> list[list[StoredMessage]]:
    """History cut into droppable turns: a user message with the replies and tool results
    after it. Dropping whole turns keeps user/assistant alternation (chat templates such as
    Gemma's refuse anything else) and never leaves an orphan tool result first."""
    units: list[list[StoredMessage]] = []
    for message in history:
        if message.payload.get("role") == "user" or not units:
            units.append([message])
        else:
            units[-1].append(message)
    return units


def prompt_build(
    *,
    system_prompt: str,
    history: list[StoredMessage],
    new_messages: list[dict[str, Any]],
    budget_tokens: int | None,
    count_tokens: Callable[[dict[str, Any]], int],
) -> tuple[list[dict[str, Any]], int]:
    """([system] + history + new_messages, number of history messages dropped).

    With a budget, the oldest history goes first until everything fits. The system prompt
    and the new messages are never dropped: if they alone exceed the budget they are
    returned anyway, and the engine's refusal is the honest answer.
    """
    client_has_system = any(m.get("role") in SYSTEM_ROLES for m in new_messages)
    head = [] if client_has_system or not system_prompt else [_system(system_prompt)]
    units = _units(history)
    dropped_units = 0
    if budget_tokens is not None:
        costs = [sum(_cost(m, count_tokens) for m in unit) for unit in units]
        fixed = sum(count_tokens(m) for m in head + new_messages)
        total = fixed + sum(costs)
        while total > budget_tokens and dropped_units < len(units):
            total -= costs[dropped_units]
            dropped_units += 1
    kept = [m.payload for unit in units[dropped_units:] for m in unit]
    return [*head, *kept, *new_messages], len(history) - len(kept)


def history_tokens(
    history: list[StoredMessage], count_tokens: Callable[[dict[str, Any]], int]
) -> int:
    """Tokens of `history`: as stored, else as `count_tokens` counts the message."""
    return sum(_cost(message, count_tokens) for message in history)


def _system(content: str) -> dict[str, Any]:
    return {"role": "system", "content": content}


def _cost(message: StoredMessage, count_tokens: Callable[[dict[str, Any]], int]) -> int:
    return message.tokens if message.tokens is not None else count_tokens(message.payload)
