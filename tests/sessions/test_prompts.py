"""prompt_build and system_prompt_resolve: pure, no database."""

from __future__ import annotations

from typing import Any

from apps.sessions.services import StoredMessage, prompt_build, system_prompt_resolve


def count_words(message: dict[str, Any]) -> int:
    """A stand-in tokenizer: one token per word of content, plus 1 of template overhead."""
    content = message.get("content") or ""
    return len(str(content).split()) + 1


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": text}


def stored(payload: dict[str, Any], tokens: int | None = None) -> StoredMessage:
    return StoredMessage(payload=payload, tokens=tokens)


def build(**kwargs: Any) -> tuple[list[dict[str, Any]], int]:
    kwargs.setdefault("system_prompt", "")
    kwargs.setdefault("history", [])
    kwargs.setdefault("budget_tokens", None)
    return prompt_build(count_tokens=count_words, **kwargs)


# --- system prompt resolution --------------------------------------------------------


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


# --- assembly ------------------------------------------------------------------------


def test_it_puts_system_then_history_then_new_messages():
    history = [stored(user("hi")), stored(assistant("hello"))]

    messages, dropped = build(
        system_prompt="Be brief.", history=history, new_messages=[user("again")]
    )

    assert messages == [
        {"role": "system", "content": "Be brief."},
        user("hi"),
        assistant("hello"),
        user("again"),
    ]
    assert dropped == 0


def test_it_adds_no_system_message_when_there_is_no_prompt():
    messages, _ = build(history=[stored(user("hi"))], new_messages=[user("x")])

    assert messages == [user("hi"), user("x")]


def test_it_lets_the_clients_system_message_win_where_the_client_put_it():
    new = [user("first"), {"role": "system", "content": "Client rules."}, user("second")]

    messages, _ = build(
        system_prompt="Configured.", history=[stored(user("old"))], new_messages=new
    )

    assert messages == [user("old"), *new]


def test_it_treats_a_developer_message_as_the_clients_system_message():
    new = [{"role": "developer", "content": "Dev rules."}, user("q")]

    messages, _ = build(system_prompt="Configured.", new_messages=new)

    assert messages == new


def test_it_does_not_trim_without_a_budget():
    history = [stored(user("word " * 1000), tokens=10_000)] * 5

    messages, dropped = build(history=history, new_messages=[user("q")])

    assert (len(messages), dropped) == (6, 0)


def test_it_does_not_mutate_its_inputs():
    history = [stored(user("a"), tokens=50), stored(assistant("b"), tokens=50)]
    new = [user("c")]

    build(system_prompt="s", history=history, new_messages=new, budget_tokens=10)

    assert history == [stored(user("a"), tokens=50), stored(assistant("b"), tokens=50)]
    assert new == [user("c")]


# --- trimming ------------------------------------------------------------------------


def test_it_drops_oldest_history_first_until_it_fits():
    history = [stored(user(f"m{i}"), tokens=10) for i in range(5)]
    # system 2 + new 2 + 5 * 10 = 54; a budget of 34 leaves room for three stored messages.

    messages, dropped = build(
        system_prompt="sys", history=history, new_messages=[user("new")], budget_tokens=34
    )

    assert dropped == 2
    assert [m["content"] for m in messages] == ["sys", "m2", "m3", "m4", "new"]


def test_it_counts_tokens_not_characters():
    long_but_cheap = [stored(user("x" * 2000), tokens=20), stored(assistant("ok"), tokens=5)]
    # Counting characters (2000 / 4 = 500) would drop this turn; in tokens it fits.
    messages, dropped = build(history=long_but_cheap, new_messages=[user("q")], budget_tokens=100)
    assert dropped == 0
    terse_but_costly = [stored(user("你好"), tokens=500), stored(assistant("ok"), tokens=5)]
    messages, dropped = build(
        history=terse_but_costly + long_but_cheap, new_messages=[user("q")], budget_tokens=100
    )
    assert dropped == 2
    assert messages == [user("x" * 2000), assistant("ok"), user("q")]


def test_it_counts_history_with_unknown_tokens_through_count_tokens():
    history = [stored(user("one two three four five six seven eight nine")), stored(user("a b"))]
    # unknown tokens: 10 and 3 by count_words; new message 2.

    messages, dropped = build(history=history, new_messages=[user("q")], budget_tokens=6)

    assert dropped == 1
    assert messages == [user("a b"), user("q")]


def test_it_prefers_known_token_counts_over_counting_again():
    history = [stored(user("many words " * 50), tokens=1)]

    messages, dropped = build(history=history, new_messages=[user("q")], budget_tokens=3)

    assert dropped == 0
    assert len(messages) == 2


def test_it_never_drops_the_system_prompt_or_the_new_messages():
    history = [stored(user("old"), tokens=5)]
    new = [user("a long new question " * 20), user("and another")]

    messages, dropped = build(
        system_prompt="keep me", history=history, new_messages=new, budget_tokens=3
    )

    assert dropped == 1
    assert messages == [{"role": "system", "content": "keep me"}, *new]


def test_it_keeps_everything_that_fits_exactly():
    history = [stored(user("a"), tokens=4), stored(assistant("b"), tokens=4)]

    _, dropped = build(history=history, new_messages=[user("q")], budget_tokens=10)

    assert dropped == 0


def test_it_drops_whole_turns_with_their_tool_calls_and_results():
    call = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        ],
    }
    result_1 = {"role": "tool", "tool_call_id": "c1", "content": "r1"}
    result_2 = {"role": "tool", "tool_call_id": "c2", "content": "r2"}
    history = [
        stored(user("ask"), tokens=5),
        stored(call, tokens=5),
        stored(result_1, tokens=1),
        stored(result_2, tokens=1),
        stored(assistant("done"), tokens=5),
        stored(user("next"), tokens=5),
        stored(assistant("ok"), tokens=5),
    ]
    # Dropping only part of the first turn would leave tool results or a reply without
    # its question at the front; the whole turn goes, and user/assistant still alternate.
    messages, dropped = build(history=history, new_messages=[user("q")], budget_tokens=12)

    assert dropped == 5
    assert messages == [user("next"), assistant("ok"), user("q")]


def test_it_drops_an_orphan_tool_message_at_the_very_front_on_its_own():
    history = [stored({"role": "tool", "tool_call_id": "x", "content": "r"}, tokens=5)]
    history.append(stored(user("u"), tokens=5))

    messages, dropped = build(history=history, new_messages=[user("q")], budget_tokens=8)

    assert dropped == 1
    assert messages == [user("u"), user("q")]


def test_it_drops_all_history_when_nothing_else_fits():
    history = [stored(user(str(i)), tokens=1) for i in range(3)]

    messages, dropped = build(
        system_prompt="s", history=history, new_messages=[user("q")], budget_tokens=0
    )

    assert dropped == 3
    assert messages == [{"role": "system", "content": "s"}, user("q")]
