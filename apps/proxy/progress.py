"""SSE comments while a managed engine starts for a streamed request (the plain call and
every round of the tool loop send the same ones)."""

from __future__ import annotations

from apps.core.context import RequestContext
from apps.engines.stage import Progress
from apps.proxy.responder import Responder


def loading_progress(ctx: RequestContext, responder: Responder) -> Progress | None:
    """For a streamed request: the callback that sends `: loading model X (N s)` while the
    scheduler waits for a replica to start, so clients and proxies keep the connection
    (the stream's headers go out with the first one). None for a whole request: it just
    waits."""
    if not ctx.stream:
        return None

    async def loading(waited: float) -> None:
        if not responder.stream_started:
            headers = [
                *ctx.response_headers,
                (b"content-type", b"text/event-stream"),
                (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no"),
            ]
            await responder.start_stream(status=200, headers=headers)
        await responder.comment(f"loading model {ctx.model} ({waited:.0f} s)")

    return loading
