"""ASGI lifespan: flush request logs and close the engine client at shutdown."""

from __future__ import annotations

from apps.engines.client import close_engine_session
from apps.proxy.request_log import request_log_writer
from apps.quotas.pipeline import quota_stage_drain


class LifespanApp:
    async def __call__(self, scope: dict, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await quota_stage_drain()
                await request_log_writer.flush()
                await close_engine_session()
                await send({"type": "lifespan.shutdown.complete"})
                return
