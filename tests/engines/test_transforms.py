"""Transforms: response_format for llama.cpp, tool calls written as text (whole and streamed)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from apps.engines.transforms import (
    ToolCallStreamParser,
    adapt_response_format,
    tool_calls_from_text,
    tool_calls_in_response,
    wants_tool_parsing,
)

WEATHER = '<tool_call>{"name": "get_weather", "arguments": {"location": "Paris"}}</tool_call>'
TIME = '<tool_call>\n{"name": "get_time", "arguments": "{\\"tz\\": \\"CET\\"}"}\n</tool_call>'
WEATHER_FN = {"name": "get_weather", "arguments": '{"location":"Paris"}'}
TIME_FN = {"name": "get_time", "arguments": '{"tz": "CET"}'}


# --- response_format ---------------------------------------------------------------------


def test_it_constrains_json_object_to_any_object_on_llamacpp():
    payload = {"model": "m", "response_format": {"type": "json_object"}, "seed": 1}
    assert adapt_response_format(payload, "llamacpp") is True
    assert payload == {
        "model": "m",
        "seed": 1,
        "response_format": {"type": "json_object", "schema": {"type": "object"}},
        "json_schema": {"type": "object"},
    }


def test_it_keeps_a_schema_given_with_json_object():
    schema = {"type": "object", "required": ["a"]}
    payload = {"response_format": {"type": "json_object", "schema": schema}}
    assert adapt_response_format(payload, "llamacpp")
    assert payload["json_schema"] == schema


def test_it_lifts_a_json_schema_to_the_top_level():
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "place", "schema": schema, "strict": True},
    }
    payload = {"response_format": copy.deepcopy(response_format)}
    assert adapt_response_format(payload, "llamacpp")
    assert payload == {"response_format": response_format, "json_schema": schema}


def test_it_uses_any_object_for_a_json_schema_without_schema():
    payload = {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}
    assert adapt_response_format(payload, "llamacpp")
    assert payload["json_schema"] == {"type": "object"}


@pytest.mark.parametrize(
    ("payload", "flavor"),
    [
        ({"response_format": {"type": "json_object"}}, "vllm"),
        ({"response_format": {"type": "json_object"}}, "openai"),
        ({"response_format": {"type": "text"}}, "llamacpp"),
        ({"response_format": "json"}, "llamacpp"),
        ({}, "llamacpp"),
        ({"response_format": {"type": "json_object"}, "json_schema": {"x": 1}}, "llamacpp"),
        ({"response_format": {"type": "json_object"}, "grammar": "root ::= 'a'"}, "llamacpp"),
    ],
)
def test_it_leaves_other_requests_alone(payload, flavor):
    before = copy.deepcopy(payload)
    assert adapt_response_format(payload, flavor) is False
    assert payload == before


# --- wants_tool_parsing ------------------------------------------------------------------


def test_it_parses_tool_calls_only_when_tools_may_be_called():
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert wants_tool_parsing({"tools": tools})
    assert wants_tool_parsing({"tools": tools, "tool_choice": "auto"})
    assert wants_tool_parsing({"tools": tools, "tool_choice": {"type": "function"}})
    assert not wants_tool_parsing({"tools": tools, "tool_choice": "none"})
    assert not wants_tool_parsing({"tools": []})
    assert not wants_tool_parsing({})


# --- non-streamed ------------------------------------------------------------------------


def fns(message: dict[str, Any]) -> list[dict[str, str]]:
    return [call["function"] for call in message.get("tool_calls") or []]


def test_it_turns_a_block_into_a_tool_call_and_empties_the_content():
    message = tool_calls_from_text({"role": "assistant", "content": f"\n{WEATHER}\n"})
    assert message["content"] is None
    [call] = message["tool_calls"]
    assert call["type"] == "function"
    assert call["id"].startswith("call_")
    assert call["function"] == WEATHER_FN


def test_it_extracts_several_calls_and_keeps_the_text_around_them():
    content = f"Let me check.\n{WEATHER}\n{TIME}\nOne moment."
    message = tool_calls_from_text({"role": "assistant", "content": content})
    assert fns(message) == [WEATHER_FN, TIME_FN]
    assert message["content"] == "Let me check.\nOne moment."
    ids = [call["id"] for call in message["tool_calls"]]
    assert len(set(ids)) == 2


def test_it_accepts_llama_style_parameters_and_missing_arguments():
    content = '<tool_call>{"name": "a", "parameters": {"x": 1}}</tool_call><tool_call>{"name": "b"}</tool_call>'
    message = tool_calls_from_text({"content": content})
    assert fns(message) == [{"name": "a", "arguments": '{"x":1}'}, {"name": "b", "arguments": "{}"}]


@pytest.mark.parametrize(
    "content",
    [
        "<tool_call>{not json}</tool_call>",
        '<tool_call>{"arguments": {}}</tool_call>',
        '<tool_call>["get_weather"]</tool_call>',
        '<tool_call>{"name": "get_weather", "arguments": {"location": "Par',  # cut by max_tokens
        "plain text with a < sign",
    ],
)
def test_it_leaves_malformed_blocks_as_text(content):
    message = {"role": "assistant", "content": content}
    assert tool_calls_from_text(message) is message


def test_it_keeps_a_malformed_block_as_text_next_to_a_good_one():
    content = f"<tool_call>oops</tool_call> {WEATHER}"
    message = tool_calls_from_text({"content": content})
    assert fns(message) == [WEATHER_FN]
    assert message["content"] == "<tool_call>oops</tool_call>"


def test_it_leaves_tool_calls_the_engine_parsed_itself():
    message = {"content": WEATHER, "tool_calls": [{"id": "x"}]}
    assert tool_calls_from_text(message) is message


def test_it_sets_finish_reason_in_a_whole_response():
    response = {
        "choices": [
            {"index": 0, "message": {"content": WEATHER}, "finish_reason": "stop"},
            {"index": 1, "message": {"content": WEATHER}, "finish_reason": "length"},
            {"index": 2, "message": {"content": "hi"}, "finish_reason": "stop"},
        ]
    }
    assert tool_calls_in_response(response) is True
    assert [c["finish_reason"] for c in response["choices"]] == ["tool_calls", "length", "stop"]
    assert tool_calls_in_response({"choices": [{"message": {"content": "hi"}}]}) is False


# --- streamed ----------------------------------------------------------------------------


def chunk(content: str | None = None, finish: str | None = None, **delta: Any) -> dict:
    if content is not None:
        delta["content"] = content
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def run(pieces: list[str]) -> list[dict]:
    parser = ToolCallStreamParser()
    out = parser.feed(chunk("", role="assistant"))
    for piece in pieces:
        out += parser.feed(chunk(piece))
    out += parser.feed(chunk(finish="stop"))
    return out + parser.flush()


def text_of(chunks: list[dict]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


def calls_of(chunks: list[dict]) -> list[dict]:
    return [
        call
        for c in chunks
        if c["choices"]
        for call in c["choices"][0]["delta"].get("tool_calls") or ()
    ]


def finish_of(chunks: list[dict]) -> str | None:
    reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert all(reason is None for reason in reasons[:-1])
    return reasons[-1]


REPLY = f"I'll look that up.\n{WEATHER}\n{TIME}\nDone: a < b, <b>ok</b>"


def splits(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 11, 13, 64, 1000])
def test_it_streams_calls_split_across_chunks_of_any_size(size):
    out = run(splits(REPLY, size))
    assert text_of(out) == "I'll look that up.\nDone: a < b, <b>ok</b>"
    calls = calls_of(out)
    assert [c["index"] for c in calls] == [0, 1]
    assert [c["function"] for c in calls] == [WEATHER_FN, TIME_FN]
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
    assert finish_of(out) == "tool_calls"


def test_it_finds_a_call_cut_at_every_possible_pair_of_points():
    text = f"hi {WEATHER} bye"
    for i in range(1, len(text)):
        for j in range(i, len(text)):
            out = run([text[:i], text[i:j], text[j:]])
            assert [c["function"] for c in calls_of(out)] == [WEATHER_FN], (i, j)
            assert text_of(out) == "hi bye", (i, j)


def test_it_passes_plain_text_through_untouched_and_at_once():
    parser = ToolCallStreamParser()
    for piece in ["Hello", " world", ", a < b", " and <b>bold</b>", " x<y", "."]:
        sent = chunk(piece)
        assert parser.feed(sent) == [sent]


def test_it_holds_only_a_possible_tag_start():
    parser = ToolCallStreamParser()
    assert text_of(parser.feed(chunk("see <tool"))) == "see"
    assert text_of(parser.feed(chunk("bar> now"))) == " <toolbar> now"


def test_it_holds_a_lone_angle_bracket_only_until_the_next_chunk():
    parser = ToolCallStreamParser()
    assert text_of(parser.feed(chunk("a <"))) == "a"
    assert text_of(parser.feed(chunk("= b"))) == " <= b"


def test_it_keeps_a_malformed_block_as_text():
    out = run(splits("<tool_call>{broken</tool_call> after", 4))
    assert text_of(out) == "<tool_call>{broken</tool_call> after"
    assert calls_of(out) == []
    assert finish_of(out) == "stop"


def test_it_sends_an_unterminated_block_as_text_when_the_reply_ends():
    out = run(splits('ok <tool_call>{"name": "f"', 3))
    assert text_of(out) == 'ok <tool_call>{"name": "f"'
    assert finish_of(out) == "stop"


def test_it_flushes_held_text_when_the_stream_stops_without_a_finish():
    parser = ToolCallStreamParser()
    parser.feed(chunk("cut <tool_"))
    [last] = parser.flush()
    assert last["choices"][0]["delta"] == {"content": " <tool_"}
    assert last["id"] == "chatcmpl-1"
    assert "usage" not in last


def test_it_keeps_finish_reason_length_and_the_role_chunk():
    parser = ToolCallStreamParser()
    role = chunk("", role="assistant")
    assert parser.feed(role) == [role]
    out = parser.feed(chunk(WEATHER)) + parser.feed(chunk(finish="length"))
    assert finish_of(out) == "length"


def test_it_emits_text_a_call_and_text_of_one_chunk_in_order():
    out = ToolCallStreamParser().feed(chunk(f"before {WEATHER} after", role="assistant"))
    deltas = [c["choices"][0]["delta"] for c in out]
    assert deltas[0] == {"role": "assistant", "content": "before"}
    assert deltas[1]["tool_calls"][0]["function"] == WEATHER_FN
    assert deltas[2] == {"content": " after"}
    assert all(c["id"] == "chatcmpl-1" for c in out)


def test_it_keeps_usage_on_the_last_chunk_only_and_passes_usage_chunks():
    parser = ToolCallStreamParser()
    usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    out = parser.feed({**chunk(f"x {WEATHER}"), "usage": usage})
    assert [c["usage"] for c in out] == [None, usage]
    usage_only = {"id": "chatcmpl-1", "choices": [], "usage": usage}
    assert parser.feed(usage_only) == [usage_only]


def test_it_sends_a_held_chunk_usage_on_its_own():
    usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    [out] = ToolCallStreamParser().feed({**chunk("<tool_c"), "usage": usage})
    assert out["choices"] == []
    assert out["usage"] == usage


def test_it_keeps_indices_after_tool_calls_the_engine_parsed():
    parser = ToolCallStreamParser()
    native = {"index": 0, "id": "n", "type": "function", "function": {"name": "x"}}
    parser.feed(chunk(tool_calls=[native]))
    [call] = calls_of(parser.feed(chunk(WEATHER)))
    assert call["index"] == 1
    assert parser.called


def test_it_tracks_choices_separately():
    parser = ToolCallStreamParser()
    both = chunk("<tool_call>")
    both["choices"].append({"index": 1, "delta": {"content": "plain"}, "finish_reason": None})
    out = parser.feed(both)
    assert [(c["choices"][0]["index"], c["choices"][0]["delta"]) for c in out] == [
        (1, {"content": "plain"})
    ]


def test_it_passes_untouched_chunks_through_as_the_same_object():
    """The steady state copies nothing: a chunk with nothing to rewrite comes back itself."""
    parser = ToolCallStreamParser()
    plain = chunk("hi")
    assert parser.feed(plain)[0] is plain
    assert [c["choices"][0]["delta"] for c in parser.feed(chunk("x <tool"))] == [{"content": "x"}]
    [held] = parser.flush()
    assert held["choices"][0]["delta"] == {"content": " <tool"}
