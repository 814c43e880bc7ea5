"""The one writer of a /v1 response: a whole answer, or a stream that ends with [DONE]."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from apps.proxy.engine_call import WholeAnswer
from apps.proxy.sse import DONE_EVENT

SendHeaders = Callable[..., Awaitable[None]]
SendBody = Callable[..., Awaitable[None]]


class Responder:
    """Writes through the consumer's send_headers/send_body (which track what was sent, so
    a failure after the headers can still end the response cleanly)."""

    def __init__(self, *, send_headers: SendHeaders, send_body: SendBody) -> None:
        self._send_headers = send_headers
        self._send_body = send_body
        self.stream_started = False
        self.started = False  # anything went to the client: no retry after this
        self.writes = 0  # what went out so far: a tool round is retried only if it sent none

    async def send_whole(self, answer: WholeAnswer) -> None:
        self.started = True
        self.writes += 1
        await self._send_headers(status=answer.status, headers=answer.headers)
        await self._send_body(answer.body)

    async def start_stream(self, *, status: int, headers: Any) -> None:
        """Send the stream's headers (once: a later round of the same answer reuses them)."""
        if not self.stream_started:
            self.stream_started = self.started = True
            self.writes += 1
            await self._send_headers(status=status, headers=headers)

    async def write(self, events: bytes) -> None:
        self.writes += 1
        await self._send_body(events, more_body=True)

    async def comment(self, text: str) -> None:
        """An SSE comment line (`: text`): keeps clients and proxies connected during long
        work without sending content."""
        self.started = True
        self.writes += 1
        await self._send_body(b": " + text.encode() + b"\n\n", more_body=True)

    async def end_stream(self) -> None:
        await self._send_body(DONE_EVENT)
