"""Relaying an engine's SSE stream: forward each event as it arrives, watch for usage.

Pure bytes-in / bytes-out, no I/O, so it is cheap on the hot path and easy to test.
The gateway always asks the engine for a usage chunk; it reaches the client only if the
client asked for it too. `data: [DONE]` is always sent last by the gateway itself.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from apps.core.context import ChunkFilter

DONE_EVENT = b"data: [DONE]\n\n"


def _has_generated_content(chunk: dict[str, Any]) -> bool:
    for choice in chunk.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        if choice.get("text"):
            return True
        delta = choice.get("delta") or {}
        if isinstance(delta, dict) and (
            delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls")
        ):
            return True
    return False


def _parsed_or_none(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


def error_event(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


class ReplyCollector:
    """Rebuilds the assistant message from chat-completion deltas (for session history).

    Events the relay had no other reason to parse are kept as they came (`add_raw`) and
    parsed together when the message is asked for, or before the next parsed chunk (so
    the order holds): one JSON parse for a stream's worth of events instead of one each."""

    def __init__(self) -> None:
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.tool_calls: dict[int, dict[str, Any]] = {}
        self._raw: list[bytes] = []  # `data:` payloads not parsed yet, in order
        self._raw_generated = 0  # of those parsed since, events that carried generated text

    def add_raw(self, data: bytes) -> None:
        self._raw.append(data)

    def add(self, chunk: dict[str, Any]) -> None:
        if self._raw:
            self._parse_raw()
        self._add(chunk)

    def _parse_raw(self) -> None:
        raw, self._raw = self._raw, []
        try:
            chunks = orjson.loads(b"[" + b",".join(raw) + b"]")
        except orjson.JSONDecodeError:  # one bad event: parse them one by one, skip it
            chunks = [_parsed_or_none(data) for data in raw]
        for chunk in chunks:
            if isinstance(chunk, dict):
                self._add(chunk)
                self._raw_generated += _has_generated_content(chunk)

    def raw_generated_events(self) -> int:
        """Events handed over unparsed (`add_raw`) that carried generated text."""
        if self._raw:
            self._parse_raw()
        return self._raw_generated

    def _add(self, chunk: dict[str, Any]) -> None:
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            # Empty strings are no text (the role chunk carries one): a stream that
            # generated nothing has no reply.
            if isinstance(delta.get("content"), str) and delta["content"]:
                self.content.append(delta["content"])
            if isinstance(delta.get("reasoning_content"), str) and delta["reasoning_content"]:
                self.reasoning.append(delta["reasoning_content"])
            for call in delta.get("tool_calls") or ():
                self._merge_tool_call(call)

    def _merge_tool_call(self, call: dict[str, Any]) -> None:
        slot = self.tool_calls.setdefault(
            int(call.get("index", 0)),
            {"id": "", "type": "function", "function": {"name": "", "arguments": ""}},
        )
        slot["id"] = call.get("id") or slot["id"]
        function = call.get("function") or {}
        slot["function"]["name"] += function.get("name") or ""
        slot["function"]["arguments"] += function.get("arguments") or ""

    def message(self) -> dict[str, Any] | None:
        """The reply so far, or None when nothing was generated."""
        if self._raw:
            self._parse_raw()
        if not (self.content or self.reasoning or self.tool_calls):
            return None
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.content)}
        if self.reasoning:
            message["reasoning_content"] = "".join(self.reasoning)
        if self.tool_calls:
            message["tool_calls"] = [self.tool_calls[i] for i in sorted(self.tool_calls)]
        return message


class SseRelay:
    def __init__(
        self,
        *,
        client_wants_usage: bool,
        collect_reply: bool = False,
        filters: list[ChunkFilter] | None = None,
    ) -> None:
        self.client_wants_usage = client_wants_usage
        self.reply = ReplyCollector() if collect_reply else None
        # The response filters' chunk filters, in order (tool-call parsing, safety, ...):
        # with any, every event is parsed and passed through them.
        self.filters = filters or []
        self.first_token_at: float | None = None  # perf_counter() of the first generated token
        self.last_token_at: float | None = None
        # Events forwarded as content without parsing them (~1 token each), or parsed and
        # seen to carry generated text; those the reply collector parses count there.
        self.content_events = 0
        self.usage: dict[str, Any] | None = None
        self.timings: dict[str, Any] | None = None
        self.saw_done = False
        self.upstream_error: dict[str, Any] | None = None
        self._tail = b""

    def feed(self, data: bytes) -> bytes:
        """Take raw bytes from the engine; return the complete events to forward now."""
        buffer = self._tail + data
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n")
        end = buffer.rfind(b"\n\n")
        if end < 0:
            self._tail = buffer
            return b""
        complete, self._tail = buffer[: end + 2], buffer[end + 2 :]
        if self._plain(complete):
            # Steady state: nothing to look at, so forward the bytes as they are.
            self.last_token_at = time.perf_counter()
            if self.reply is None:
                self.content_events += complete.count(b"\n\n")
                return complete
            for event in complete.split(b"\n\n"):
                if event.startswith(b"data:"):
                    self.reply.add_raw(event[5:])
            return complete
        out = [self._relay(event) for event in complete.split(b"\n\n") if event]
        return b"".join(event for event in out if event)

    def _plain(self, events: bytes) -> bool:
        """True when no event needs parsing: the first token is seen, no usage, no error,
        no [DONE] (which the gateway itself sends last)."""
        return (
            not self.filters
            and self.first_token_at is not None
            and b'"usage":{' not in events
            and b'"usage": {' not in events
            and b'"error"' not in events
            and b"[DONE]" not in events
        )

    def _relay(self, event: bytes) -> bytes:
        if not event.startswith(b"data:"):
            return event + b"\n\n"  # comments, `event:` lines: pass through untouched
        data = event[5:].strip()
        if data == b"[DONE]":
            self.saw_done = True
            return self._flush_filters()
        wants_parse = (
            bool(self.filters)
            or self.first_token_at is None
            or (b'"usage"' in data and b'"usage":null' not in data and b'"usage": null' not in data)
            or b'"error"' in data
        )
        if not wants_parse:
            self.last_token_at = time.perf_counter()
            if self.reply is None:
                self.content_events += 1
            else:
                self.reply.add_raw(data)
            return event + b"\n\n"
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            return event + b"\n\n"
        if not isinstance(chunk, dict):
            return event + b"\n\n"
        if not self.filters:
            return self._relay_chunk(event, chunk)
        # Re-encoded even when a filter returns the chunk it got: it may have changed it.
        return self.encode(self._through_filters([chunk]))

    def _through_filters(self, chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for chunk_filter in self.filters:
            chunks = [out for chunk in chunks for out in chunk_filter.feed(chunk)]
        return chunks

    def _flush_filters(self) -> bytes:
        """What the filters still hold at the end: each one's flush goes through the
        filters after it."""
        out: list[dict[str, Any]] = []
        for chunk_filter in self.filters:
            out = [piece for chunk in out for piece in chunk_filter.feed(chunk)]
            out += chunk_filter.flush()
        return self.encode(out)

    def encode(self, chunks: list[dict[str, Any]]) -> bytes:
        """Chunks made or changed by the gateway, as events (accounted like the engine's)."""
        return b"".join(self._relay_chunk(None, chunk) for chunk in chunks)

    def _relay_chunk(self, event: bytes | None, chunk: dict[str, Any]) -> bytes:
        """Forward one parsed chunk: the engine's own bytes (`event`), or re-serialised."""
        if event is None:
            event = b"data: " + orjson.dumps(chunk)
        if isinstance(chunk.get("error"), dict):
            self.upstream_error = chunk["error"]
        if self.reply is not None:
            self.reply.add(chunk)
        if _has_generated_content(chunk):
            self.content_events += 1
            self.last_token_at = time.perf_counter()
            if self.first_token_at is None:
                self.first_token_at = self.last_token_at
        if isinstance(chunk.get("timings"), dict):
            self.timings = chunk["timings"]
        usage = chunk.get("usage")
        if not isinstance(usage, dict) or self.client_wants_usage:
            if isinstance(usage, dict):
                self.usage = usage
            return event + b"\n\n"
        self.usage = usage
        if not chunk.get("choices"):
            return b""  # the usage-only chunk the client did not ask for
        del chunk["usage"]
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    def generated_events(self) -> int:
        """Events that carried generated text (~1 token each): the completion's size when
        the engine reports no usage. Exact when the reply is collected (every event is
        parsed, at the end); otherwise content events forwarded unparsed count too."""
        raw = self.reply.raw_generated_events() if self.reply is not None else 0
        return self.content_events + raw

    def finish(self) -> bytes:
        """Whatever incomplete event is left when the engine closes the stream."""
        tail, self._tail = self._tail.strip(), b""
        out = self._relay(tail) if tail else b""
        if not self.saw_done:
            out += self._flush_filters()
        return out
