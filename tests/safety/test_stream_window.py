"""The streamed-answer window: matches split across chunks are caught before any of
their text is released; redaction waits until a match can no longer grow."""

from __future__ import annotations

import pytest

from apps.core.context import StreamStop
from apps.safety.response import StreamWindow
from tests.safety.helpers import chat_chunk, delivered, rule, state_of


def window(*rules, holdback: int = 16) -> StreamWindow:
    state, snapshot = state_of(*rules)
    stage_rules = snapshot.for_key(tenant_id=1, key_id=1, stage="response")
    return StreamWindow(ctx=None, state=state, rules=stage_rules, holdback=holdback)


def feed_all(w: StreamWindow, pieces: list[str]) -> list[dict]:
    out = w.feed(chat_chunk(role=True))
    for piece in pieces:
        out += w.feed(chat_chunk(piece))
    out += w.feed(chat_chunk(finish="stop"))
    return out + w.flush()


async def test_it_passes_clean_text_through_whole_and_in_order():
    w = window(rule("bomb", r"how to build a bomb"))
    out = feed_all(w, ["Hello ", "there, ", "how are ", "you today?"])
    assert delivered(out) == "Hello there, how are you today?"
    assert out[-1]["choices"][0]["finish_reason"] == "stop"


async def test_it_holds_back_at_most_the_holdback():
    w = window(rule("x", r"forbidden"), holdback=4)
    w.feed(chat_chunk(role=True))
    assert delivered(w.feed(chat_chunk("abcdefgh"))) == "abcd"
    assert delivered(w.feed(chat_chunk("ij"))) == "ef"


async def test_it_stops_a_match_split_across_chunks_before_any_of_it_is_sent():
    w = window(rule("secret-word", r"swordfish"))
    sent = w.feed(chat_chunk(role=True))
    sent += w.feed(chat_chunk("The password is swo"))
    with pytest.raises(StreamStop) as stop:
        w.feed(chat_chunk("rdfish, keep it."))
    assert "swo" not in delivered(sent)
    assert stop.value.error.code == "content_filter"
    assert "secret-word" in stop.value.error.message
    assert stop.value.final_chunks[0]["choices"][0]["finish_reason"] == "content_filter"


async def test_it_redacts_a_split_match_only_once_it_is_complete():
    w = window(rule("email", r"[a-z]+@[a-z]+\.[a-z]{2,6}", action="redact"), holdback=16)
    out = feed_all(w, ["write to bob@exa", "mple.co", "m please"])
    assert delivered(out) == "write to [REDACTED] please"


async def test_it_releases_a_short_answer_only_when_it_finishes():
    w = window(rule("x", r"nuke"), holdback=64)
    w.feed(chat_chunk(role=True))
    assert w.feed(chat_chunk("all fine")) == []  # held: the window is not full yet
    out = w.feed(chat_chunk(finish="stop"))
    assert delivered(out) == "all fine"
    assert out[-1]["choices"][0]["finish_reason"] == "stop"


async def test_it_charges_what_the_engine_generated_when_it_stops_a_stream():
    from apps.core.context import RequestContext

    state, snapshot = state_of(rule("x", r"forbidden"))
    ctx = RequestContext(endpoint="chat.completions")
    w = StreamWindow(
        ctx=ctx,
        state=state,
        rules=snapshot.for_key(tenant_id=1, key_id=1, stage="response"),
        holdback=8,
    )
    for piece in ["a ", "b ", "c ", "forbid"]:
        w.feed(chat_chunk(piece))
    with pytest.raises(StreamStop):
        w.feed(chat_chunk("den"))
    ctx.status = 200
    ctx.record_usage(None, fallback_completion=1)  # one chunk was sent, the rest held back
    await ctx.finish()
    assert ctx.completion_tokens == 5


async def test_it_holds_back_only_as_much_as_the_longest_match_needs():
    state, snapshot = state_of(rule("code", r"launch code \d{4}"), rule("x", r"nuke"))
    rules = snapshot.for_key(tenant_id=1, key_id=1, stage="response")
    assert rules.holdback(64) == 15  # "launch code 1234" is 16 characters
    unbounded = state_of(rule("dots", r"a.+b"))[1].for_key(tenant_id=1, key_id=1, stage="response")
    assert unbounded.holdback(64) == 64
    w = StreamWindow(ctx=None, state=state, rules=rules, holdback=rules.holdback(64))
    assert delivered(w.feed(chat_chunk("x" * 20))) == "x" * 5
