"""Engine-specific request and response rewrites: structured output, tool calls as text.

Pure functions and a small state machine, no I/O: the pipeline calls them on parsed JSON.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

import orjson

OPEN_TAG = "<tool_call>"
CLOSE_TAG = "</tool_call>"
# Forces the output to be a JSON object (an empty schema would allow any JSON value).
ANY_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}


# --- response_format -----------------------------------------------------------------


def adapt_response_format(payload: dict[str, Any], flavor: str) -> bool:
    """Add llama.cpp's own `json_schema` field for an OpenAI `response_format`; True if changed.

    Recent llama-server reads `response_format` itself, older ones only the top-level
    `json_schema`; setting both (consistently) constrains the output on either. Nothing the
    client sent is removed. Skipped when the client set `json_schema` or a `grammar` itself
    (llama-server refuses both at once). Other flavors (vLLM) support response_format.
    """
    if flavor != "llamacpp" or "json_schema" in payload or payload.get("grammar"):
        return False
    response_format = payload.get("response_format")
    if not isinstance(response_format, dict):
        return False
    kind = response_format.get("type")
    if kind == "json_object":
        schema = response_format.get("schema")
        if not isinstance(schema, dict):
            # llama.cpp reads a schema here too; without one it would allow any JSON value.
            schema = response_format["schema"] = dict(ANY_OBJECT_SCHEMA)
    elif kind == "json_schema":
        wrapper = response_format.get("json_schema")
        schema = wrapper.get("schema") if isinstance(wrapper, dict) else None
        if not isinstance(schema, dict):
            schema = dict(ANY_OBJECT_SCHEMA)
    else:
        return False  # "text", or something the engine will judge itself
    payload["json_schema"] = schema
    return True


# --- tool calls written as text --------------------------------------------------------


def wants_tool_parsing(payload: dict[str, Any]) -> bool:
    """True if the request offered tools and allowed the model to call them."""
    tools = payload.get("tools")
    return isinstance(tools, list) and bool(tools) and payload.get("tool_choice") != "none"


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def parse_tool_call(block: str) -> dict[str, Any] | None:
    """The OpenAI tool call written inside one <tool_call> block, or None if malformed.

    Accepts `arguments` (or Llama-style `parameters`) as an object or a JSON string.
    """
    try:
        data = orjson.loads(block.strip())
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        return None
    arguments = data.get("arguments", data.get("parameters"))
    if arguments is None:
        arguments = "{}"
    elif not isinstance(arguments, str):
        arguments = orjson.dumps(arguments).decode()
    return {
        "id": new_call_id(),
        "type": "function",
        "function": {"name": name.strip(), "arguments": arguments},
    }


def _split_blocks(text: str) -> tuple[list[dict[str, Any]], str]:
    """(calls, text without their blocks) of a whole reply; malformed blocks stay text."""
    calls: list[dict[str, Any]] = []
    kept: list[str] = []
    done = search = 0
    while (start := text.find(OPEN_TAG, search)) >= 0:
        end = text.find(CLOSE_TAG, start + len(OPEN_TAG))
        if end < 0:
            break  # unterminated (e.g. cut by max_tokens): stays text
        stop = end + len(CLOSE_TAG)
        call = parse_tool_call(text[start + len(OPEN_TAG) : end])
        if call is not None:
            calls.append(call)
            # Whitespace before a call only separated it; the streamed parser drops it too.
            kept.append(text[done:start].rstrip())
            done = stop
        search = stop
    kept.append(text[done:])
    return calls, "".join(kept)


def tool_calls_from_text(message: dict[str, Any]) -> dict[str, Any]:
    """The chat message with <tool_call> blocks in its content turned into `tool_calls`.

    Returns `message` itself when there is nothing to do (no blocks, or the engine already
    parsed tool calls); else a new message whose content is the remaining text stripped, or
    None. The caller then sets the choice's finish_reason (see tool_calls_in_response).
    """
    content = message.get("content")
    if message.get("tool_calls") or not isinstance(content, str) or OPEN_TAG not in content:
        return message
    calls, rest = _split_blocks(content)
    if not calls:
        return message
    return {**message, "content": rest.strip() or None, "tool_calls": calls}


def tool_calls_in_response(response: dict[str, Any]) -> bool:
    """Apply tool_calls_from_text to each choice of a chat completion; True if any changed.

    finish_reason "stop" becomes "tool_calls"; "length" is kept, as the client must still
    learn that the output was cut.
    """
    changed = False
    for choice in response.get("choices") or ():
        if not isinstance(choice, dict) or not isinstance(choice.get("message"), dict):
            continue
        message = tool_calls_from_text(choice["message"])
        if message is choice["message"]:
            continue
        choice["message"] = message
        if choice.get("finish_reason") in ("stop", None):
            choice["finish_reason"] = "tool_calls"
        changed = True
    return changed


# --- streaming -------------------------------------------------------------------------


def _partial_open_length(text: str, low: int) -> int:
    """Length of the longest end of `text[low:]` that could begin an OPEN_TAG."""
    tail = text[max(low, len(text) - len(OPEN_TAG) + 1) :]
    start = tail.find("<")
    while start >= 0:
        if OPEN_TAG.startswith(tail[start:]):
            return len(tail) - start
        start = tail.find("<", start + 1)
    return 0


Segment = str | dict[str, Any]  # text to emit, or a finished tool call


@dataclass
class _ChoiceStream:
    """Per-choice state. `held` is text not emitted yet: trailing whitespace (dropped if a
    tool call follows), a possible start of OPEN_TAG, or an unterminated block."""

    held: str = ""
    calls: int = 0

    def feed(self, text: str) -> list[Segment]:
        buffer, self.held = self.held + text, ""
        out: list[Segment] = []
        done = search = 0
        cut = len(buffer)
        while True:
            start = buffer.find(OPEN_TAG, search)
            if start < 0:
                cut = len(buffer) - _partial_open_length(buffer, search)
                break
            end = buffer.find(CLOSE_TAG, start + len(OPEN_TAG))
            if end < 0:
                cut = start  # an open block: wait for its end
                break
            stop = end + len(CLOSE_TAG)
            call = parse_tool_call(buffer[start + len(OPEN_TAG) : end])
            if call is not None:
                self._text(out, buffer[done:start].rstrip())
                out.append(call)
                done = stop
            search = stop  # a malformed block stays text; scan on after it
        text_part = buffer[done:cut]
        emitted = text_part.rstrip()
        self._text(out, emitted)
        self.held = text_part[len(emitted) :] + buffer[cut:]
        return out

    def flush(self) -> list[str]:
        """Held text at the end of the reply; whitespace after tool calls is dropped."""
        held, self.held = self.held, ""
        if not held or (self.calls and not held.strip()):
            return []
        return [held]

    def _text(self, out: list[Segment], text: str) -> None:
        if text:
            out.append(text)

    def call_delta(self, call: dict[str, Any]) -> dict[str, Any]:
        delta = {"tool_calls": [{"index": self.calls, **call}]}
        self.calls += 1
        return delta


class ToolCallStreamParser:
    """Turns <tool_call> blocks in streamed chat chunks into `tool_calls` deltas.

    feed() takes each chat.completion.chunk dict and returns the chunks to send instead
    (the same dict, uncopied, in the steady state). Text passes through at once; only what
    could be the start of a block (a "<tool_call>" prefix at the very end) and trailing
    whitespace wait for the next chunk, and a block is held until it is complete. A chunk
    carrying a finish_reason also releases what is held (an unterminated block goes out as
    plain text) and turns "stop" into "tool_calls" if a call was emitted. flush() returns
    what is still held when the stream ends without a finish_reason (engine broke off).
    """

    def __init__(self) -> None:
        self._choices: dict[int, _ChoiceStream] = {}
        self._last: dict[str, Any] = {}  # the last chunk with choices: flush() copies its id etc.

    @property
    def called(self) -> bool:
        """True once any tool call was emitted."""
        return any(state.calls for state in self._choices.values())

    def feed(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        choices = chunk.get("choices")
        if not isinstance(choices, list) or not choices:
            return [chunk]  # e.g. the usage-only chunk
        self._last = chunk
        out_choices: list[dict[str, Any]] = []
        unchanged = True
        for choice in choices:
            rewritten = self._choice(choice) if isinstance(choice, dict) else [choice]
            unchanged = unchanged and len(rewritten) == 1 and rewritten[0] is choice
            out_choices.extend(rewritten)
        if unchanged:
            return [chunk]  # the steady state: no copy
        return self._chunks(chunk, out_choices)

    def flush(self) -> list[dict[str, Any]]:
        envelope = {k: v for k, v in self._last.items() if k not in ("choices", "usage")}
        out = []
        for index, state in self._choices.items():
            for text in state.flush():
                choice = {"index": index, "delta": {"content": text}, "finish_reason": None}
                out.append({**envelope, "choices": [choice]})
        return out

    def _choice(self, choice: dict[str, Any]) -> list[dict[str, Any]]:
        """The choice as one or more choices, in order (text, calls, text ...)."""
        index = choice.get("index", 0)
        state = self._choices.setdefault(index, _ChoiceStream())
        delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
        content = delta.get("content")
        for call in delta.get("tool_calls") or ():  # parsed by the engine: keep indices apart
            if isinstance(call, dict) and isinstance(call.get("index"), int):
                state.calls = max(state.calls, call["index"] + 1)
        finish = choice.get("finish_reason")
        if not self._needs_work(state, content, finish):
            return [choice]
        segments = state.feed(content) if isinstance(content, str) else []
        if finish is not None:
            segments += state.flush()
        deltas = [{"content": s} if isinstance(s, str) else state.call_delta(s) for s in segments]
        rest = {k: v for k, v in delta.items() if k != "content"}  # role, reasoning, ...
        if deltas:
            deltas[0] = {**rest, **deltas[0]}
        else:
            deltas = [rest]
        if finish == "stop" and state.calls:
            finish = "tool_calls"
        return self._split_choice(choice, deltas, finish)

    @staticmethod
    def _needs_work(state: _ChoiceStream, content: Any, finish: Any) -> bool:
        if state.held or (finish is not None and state.calls):
            return True
        if not isinstance(content, str) or not content:
            return False
        # Fast path: text without "<" and not ending in whitespace goes out untouched.
        return "<" in content or content[-1].isspace()

    @staticmethod
    def _split_choice(
        choice: dict[str, Any], deltas: list[dict[str, Any]], finish: Any
    ) -> list[dict[str, Any]]:
        """One choice per non-empty delta; logprobs ride on the first, finish_reason on the
        last. Nothing at all when everything was held back."""
        deltas = [delta for delta in deltas if delta]
        if finish is not None and not deltas:
            deltas = [{}]
        out = []
        for i, delta in enumerate(deltas):
            piece = {**choice, "delta": delta, "finish_reason": None}
            if i and "logprobs" in piece:
                piece["logprobs"] = None
            out.append(piece)
        if out:
            out[-1]["finish_reason"] = finish
        return out

    def _chunks(self, chunk: dict[str, Any], choices: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One chunk per choice; usage (non-null only on the last chunk) stays on the last."""
        envelope = {k: v for k, v in chunk.items() if k != "choices"}
        out = []
        for i, choice in enumerate(choices):
            out_chunk = {**envelope, "choices": [choice]}
            if i < len(choices) - 1 and out_chunk.get("usage") is not None:
                out_chunk["usage"] = None
            out.append(out_chunk)
        if not out and envelope.get("usage") is not None:
            out.append({**envelope, "choices": []})
        return out
