"""Relaying an engine's SSE stream: forward each event as it arrives, watch for usage.

Pure bytes-in / bytes-out, no I/O, so it is cheap on the hot path and easy to test.
The gateway always asks the engine for a usage chunk; it reaches the client only if the
client asked for it too. `data: [DONE]` is always sent last by the gateway itself.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

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


def error_event(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


class SseRelay:
    def __init__(self, *, client_wants_usage: bool) -> None:
        self.client_wants_usage = client_wants_usage
        self.first_token_at: float | None = None  # perf_counter() of the first generated token
        self.content_events = 0  # events carrying generated text: ~1 token each
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
            self.content_events += complete.count(b"\n\n")
            return complete
        out = [self._relay(event) for event in complete.split(b"\n\n") if event]
        return b"".join(event for event in out if event)

    def _plain(self, events: bytes) -> bool:
        """True when no event needs parsing: the first token is seen, no usage, no error,
        no [DONE] (which the gateway itself sends last)."""
        return (
            self.first_token_at is not None
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
            return b""
        wants_parse = (
            self.first_token_at is None
            or (b'"usage"' in data and b'"usage":null' not in data and b'"usage": null' not in data)
            or b'"error"' in data
        )
        if not wants_parse:
            self.content_events += 1
            return event + b"\n\n"
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            return event + b"\n\n"
        if not isinstance(chunk, dict):
            return event + b"\n\n"
        return self._relay_chunk(event, chunk)

    def _relay_chunk(self, event: bytes, chunk: dict[str, Any]) -> bytes:
        if isinstance(chunk.get("error"), dict):
            self.upstream_error = chunk["error"]
        if _has_generated_content(chunk):
            self.content_events += 1
            if self.first_token_at is None:
                self.first_token_at = time.perf_counter()
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

    def finish(self) -> bytes:
        """Whatever incomplete event is left when the engine closes the stream."""
        tail, self._tail = self._tail.strip(), b""
        return self._relay(tail) if tail else b""
