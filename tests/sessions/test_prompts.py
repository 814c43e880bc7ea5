"""prompt_head, history_trim and system_prompt_resolve: pure, no database. How the open
cuts a history into units is tested against the database in test_services.py."""

from __future__ import annotations

from typing import Any

import orjson

from apps.core.context import NO_HISTORY, messages_with_history
from apps.sessions.services import (
    StoredHistory,
    history_trim,
    prompt_head,
    system_prompt_resolve,
)


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": text}


def history_of(*units: tuple[list[dict[str, Any]], int]) -> StoredHistory:
    """A history as the open returns it: units of (messages, token cost)."""
    texts = [b",".join(orjson.dumps(m) for m in messages) for messages, _ in units]
    offsets, at = [], 0
    for text in texts:
        offsets.append(at)
        at += len(text) + 1
    return StoredHistory(
        json=b",".join(texts),
        unit_offsets=tuple(offsets),
        unit_tokens=tuple(tokens for _, tokens in units),
        unit_messages=tuple(len(messages) for messages, _ in units),
    )


def sent(history: StoredHistory, *, budget: int | None, fixed: int = 0) -> list[dict[str, Any]]:
    return messages_with_history(
        [], history_trim(history, fixed_tokens=fixed, budget_tokens=budget)
    )


# --- system prompt ---------------------------------------------------------------------


def test_it_resolves_the_most_specific_system_prompt():
    resolve = system_prompt_resolve
    assert (
        resolve(tenant_system_prompt="t", variant_system_prompt="v", session_system_prompt="s")
        == "s"
    )
    assert resolve(tenant_system_prompt="t", variant_system_prompt="v") == "v"
    assert (
        resolve(tenant_system_prompt="t", variant_system_prompt="", session_system_prompt="") == "t"
    )
    assert resolve(tenant_system_prompt="", variant_system_prompt="") == ""


def test_it_puts_the_system_prompt_first():
    assert prompt_head("Be brief.", [user("q")]) == [{"role": "system", "content": "Be brief."}]


def test_it_adds_no_system_message_when_there_is_no_prompt():
    assert prompt_head("", [user("q")]) == []


def test_it_lets_the_clients_system_or_developer_message_win():
    assert prompt_head("Configured.", [user("a"), {"role": "system", "content": "x"}]) == []
    assert prompt_head("Configured.", [{"role": "developer", "content": "x"}, user("q")]) == []


# --- trimming ------------------------------------------------------------------------


def test_it_does_not_trim_without_a_budget():
    history = history_of(*[([user("word " * 1000)], 10_000)] * 5)

    kept = history_trim(history, fixed_tokens=10, budget_tokens=None)

    assert (kept.messages, kept.tokens) == (5, 50_000)
    assert len(sent(history, budget=None)) == 5


def test_it_drops_oldest_units_first_until_it_fits():
    history = history_of(*[([user(f"m{i}"), assistant(f"r{i}")], 10) for i in range(5)])
    # fixed 4 + 5 * 10 = 54; a budget of 34 leaves room for three units.

    kept = history_trim(history, fixed_tokens=4, budget_tokens=34)

    assert (kept.messages, kept.tokens) == (6, 30)
    assert [m["content"] for m in sent(history, budget=34, fixed=4)] == [
        "m2", "r2", "m3", "r3", "m4", "r4",
    ]  # fmt: skip


def test_it_counts_tokens_not_characters():
    terse_but_costly = ([user("你好"), assistant("ok")], 505)
    long_but_cheap = ([user("x" * 2000), assistant("ok")], 25)

    assert sent(history_of(long_but_cheap), budget=100) == [user("x" * 2000), assistant("ok")]
    assert sent(history_of(terse_but_costly, long_but_cheap), budget=100) == [
        user("x" * 2000),
        assistant("ok"),
    ]


def test_it_keeps_everything_that_fits_exactly():
    history = history_of(([user("a"), assistant("b")], 8))

    assert history_trim(history, fixed_tokens=2, budget_tokens=10).messages == 2


def test_it_drops_all_history_when_the_rest_alone_does_not_fit():
    history = history_of(*[([user(str(i))], 1) for i in range(3)])

    assert history_trim(history, fixed_tokens=5, budget_tokens=3) == NO_HISTORY


def test_it_keeps_a_dropped_units_unicode_and_quotes_out_of_the_kept_text():
    tricky = user('é "quoted" \\ \ufffd 😀 你好')
    history = history_of(([tricky, assistant("ß")], 10), ([user("next"), assistant('"x"')], 5))

    assert sent(history, budget=5) == [user("next"), assistant('"x"')]
    assert sent(history, budget=15) == [tricky, assistant("ß"), user("next"), assistant('"x"')]
