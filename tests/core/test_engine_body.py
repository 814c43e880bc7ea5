"""engine_body and messages_with_history: a session's stored history spliced as stored."""

from __future__ import annotations

import orjson

from apps.core.context import RequestContext, SessionHistory, engine_body, messages_with_history

SYSTEM = {"role": "system", "content": "rules"}
DEVELOPER = {"role": "developer", "content": "more rules"}
NEW = {"role": "user", "content": "now"}
# As PostgreSQL's jsonb writes it out: spaces after separators, non-ASCII as is.
STORED = '{"role": "user", "content": "é \\"q\\" \ufffd"}, {"role": "assistant", "content": "a"}'
HISTORY = SessionHistory(json=STORED.encode(), messages=2)
PARSED = orjson.loads(b"[" + STORED.encode() + b"]")


def body_of(messages: list, history: SessionHistory = HISTORY) -> bytes:
    ctx = RequestContext(endpoint="chat.completions", body=b"{}", payload_changed=True)
    ctx.payload, ctx.history = {"model": "m", "messages": messages}, history
    return engine_body(ctx)


def test_it_splices_the_history_after_the_leading_system_messages():
    assert orjson.loads(body_of([SYSTEM, DEVELOPER, NEW]))["messages"] == [
        SYSTEM, DEVELOPER, *PARSED, NEW,
    ]  # fmt: skip
    assert orjson.loads(body_of([NEW, SYSTEM]))["messages"] == [*PARSED, NEW, SYSTEM]
    assert orjson.loads(body_of([]))["messages"] == PARSED


def test_it_sends_the_stored_bytes_as_they_are():
    assert STORED.encode() in body_of([SYSTEM, NEW])


def test_it_forwards_the_clients_body_when_nothing_changed_it():
    ctx = RequestContext(endpoint="chat.completions", body=b'{"model":  "m"}')
    ctx.payload = {"model": "m"}
    assert engine_body(ctx) == b'{"model":  "m"}'


def test_it_gives_the_whole_conversation_parsed():
    assert messages_with_history([SYSTEM, NEW], HISTORY) == [SYSTEM, *PARSED, NEW]
    assert messages_with_history([NEW], SessionHistory()) == [NEW]
