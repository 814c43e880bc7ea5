"""SseRelay: event framing, usage capture and stripping, without any I/O."""

from __future__ import annotations

import orjson

from apps.proxy.sse import SseRelay


def event(payload: dict) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def content(text: str) -> dict:
    return {
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
        "usage": None,
    }


USAGE = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}


def test_it_forwards_complete_events_and_holds_partial_ones():
    relay = SseRelay(client_wants_usage=False)
    whole = event(content("a")) + event(content("b"))
    assert relay.feed(whole[:10]) == b""
    assert relay.feed(whole[10:]) == whole
    assert relay.generated_events() == 2
    assert relay.first_token_at is not None


def test_it_drops_the_usage_only_chunk_the_client_did_not_ask_for():
    relay = SseRelay(client_wants_usage=False)
    out = relay.feed(event(content("a")) + event(USAGE) + b"data: [DONE]\n\n")
    assert out == event(content("a"))
    assert relay.usage == USAGE["usage"]
    assert relay.saw_done


def test_it_keeps_the_usage_chunk_when_asked():
    relay = SseRelay(client_wants_usage=True)
    assert relay.feed(event(USAGE)) == event(USAGE)
    assert relay.usage == USAGE["usage"]


def test_it_strips_usage_riding_on_a_chunk_with_choices():
    chunk = {**content("z"), "usage": {"prompt_tokens": 1, "completion_tokens": 1}}
    relay = SseRelay(client_wants_usage=False)
    out = orjson.loads(relay.feed(event(chunk))[6:])
    assert "usage" not in out
    assert out["choices"][0]["delta"]["content"] == "z"
    assert relay.usage == {"prompt_tokens": 1, "completion_tokens": 1}


def test_it_handles_crlf_framing_comments_and_a_trailing_event():
    relay = SseRelay(client_wants_usage=False)
    out = relay.feed(b": ping\r\n\r\n" + event(content("a")).replace(b"\n", b"\r\n"))
    assert out == b": ping\n\n" + event(content("a"))
    assert relay.feed(b"data: " + orjson.dumps(content("b"))) == b""
    assert relay.finish() == event(content("b"))


def test_it_does_not_count_role_only_chunks_as_the_first_token():
    relay = SseRelay(client_wants_usage=False)
    relay.feed(event({"choices": [{"delta": {"role": "assistant", "content": ""}}]}))
    assert relay.first_token_at is None
    relay.feed(event(content("x")))
    assert relay.first_token_at is not None


def test_it_remembers_an_error_event_from_the_engine():
    relay = SseRelay(client_wants_usage=False)
    relay.feed(event(content("x")) + event({"error": {"message": "boom", "code": 500}}))
    assert relay.upstream_error == {"message": "boom", "code": 500}


def delta(**fields) -> dict:
    return {"choices": [{"index": 0, "delta": fields, "finish_reason": None}], "usage": None}


def test_it_rebuilds_the_reply_from_events_in_any_framing():
    stream = [
        event(delta(role="assistant", content="")),
        event(delta(reasoning_content="think ")),
        *(event(content(piece)) for piece in ("Hel", "lo", " there")),
        event({"choices": [{"index": 1, "delta": {"content": "other choice"}}]}),
        event(delta(tool_calls=[{"index": 0, "id": "c1", "function": {"name": "get"}}])),
        event(delta(tool_calls=[{"index": 0, "function": {"arguments": '{"a":'}}])),
        event(delta(tool_calls=[{"index": 0, "function": {"arguments": " 1}"}}])),
        event(USAGE),
        b"data: [DONE]\n\n",
    ]
    whole = b"".join(stream)
    expected = {
        "role": "assistant",
        "content": "Hello there",
        "reasoning_content": "think ",
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get", "arguments": '{"a": 1}'}}
        ],
    }
    # All at once, an event per read, and cut in the middle of events.
    for reads in (
        [whole],
        stream,
        [whole[i : i + 37] for i in range(0, len(whole), 37)],
    ):
        relay = SseRelay(client_wants_usage=False, collect_reply=True)
        forwarded = b"".join(relay.feed(data) for data in reads) + relay.finish()
        assert relay.reply is not None
        assert relay.reply.message() == expected
        assert forwarded == b"".join(stream[:-2])  # usage dropped, [DONE] is the gateway's
        assert relay.generated_events() == 8  # not the role chunk, the usage or [DONE]


def test_it_skips_an_unreadable_event_when_rebuilding_the_reply():
    relay = SseRelay(client_wants_usage=False, collect_reply=True)
    relay.feed(event(content("a")) + b"data: {not json}\n\n" + event(content("b")))
    relay.feed(event(content("c")))
    assert relay.reply is not None
    assert relay.reply.message() == {"role": "assistant", "content": "abc"}


def test_it_has_no_reply_when_nothing_was_generated():
    relay = SseRelay(client_wants_usage=False, collect_reply=True)
    relay.feed(event(delta(role="assistant", content="")) + event(USAGE))
    assert relay.reply is not None
    assert relay.reply.message() is None


# --- chunk filters (the response filters' stream side) ------------------------------------


class Upper:
    """Rewrites content to upper case."""

    def feed(self, chunk: dict) -> list[dict]:
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            if delta.get("content"):
                delta["content"] = delta["content"].upper()
        return [chunk]

    def flush(self) -> list[dict]:
        return [content("end")]


class HoldAll:
    """Holds every content chunk back and releases them joined at the end."""

    def __init__(self) -> None:
        self.held: list[str] = []

    def feed(self, chunk: dict) -> list[dict]:
        delta = (chunk.get("choices") or [{}])[0].get("delta") or {}
        if delta.get("content"):
            self.held.append(delta["content"])
            return []
        return [chunk]

    def flush(self) -> list[dict]:
        return [content("".join(self.held))]


def texts(out: bytes) -> list[str]:
    events = [orjson.loads(e[6:]) for e in out.split(b"\n\n") if e.startswith(b"data: {")]
    return [e["choices"][0]["delta"]["content"] for e in events if e.get("choices")]


def test_it_passes_every_chunk_through_the_filters_in_order():
    relay = SseRelay(client_wants_usage=False, collect_reply=True, filters=[Upper(), HoldAll()])
    assert texts(relay.feed(event(content("ab")) + event(content("c")))) == []
    # At the end the first filter's flush goes through the second before it flushes.
    assert texts(relay.feed(b"data: [DONE]\n\n")) == ["ABCend"]
    assert relay.reply.message()["content"] == "ABCend"  # what the client got
    assert relay.first_token_at is not None


def test_it_flushes_the_filters_when_the_engine_ends_without_done():
    relay = SseRelay(client_wants_usage=False, filters=[HoldAll()])
    relay.feed(event(content("x")))
    assert texts(relay.finish()) == ["x"]


def test_it_still_strips_the_usage_chunk_with_filters():
    relay = SseRelay(client_wants_usage=False, filters=[Upper()])
    out = relay.feed(event(content("a")) + event(USAGE))
    assert texts(out) == ["A"]
    assert b'"usage":{' not in out
    assert relay.usage == USAGE["usage"]
