"""The floor under the gateway: a bare Channels proxy, nothing but the forwarding.

One AsyncHttpConsumer that POSTs the body to the engine with a shared aiohttp session and
relays the answer (whole, or chunk by chunk for SSE), served by uvicorn with uvloop and
httptools like the gateway: no auth, validation, scheduling, quotas or logs. bench/run.py
measures it in the same run, so "gateway / bare" tells what the pipeline itself costs
beyond what any Channels + aiohttp proxy pays on this machine.

    BARE_ENGINE_URL=http://127.0.0.1:8080 uvicorn bench.bare_proxy:application --lifespan off
"""

from __future__ import annotations

import os

import django
from django.conf import settings

if not settings.configured:
    settings.configure(DEBUG=False, INSTALLED_APPS=["channels"], ALLOWED_HOSTS=["*"])
    django.setup()

import aiohttp
from channels.generic.http import AsyncHttpConsumer
from channels.routing import URLRouter
from django.urls import path

ENGINE_URL = os.environ.get("BARE_ENGINE_URL", "http://127.0.0.1:8080")
JSON = [(b"content-type", b"application/json")]
_session: aiohttp.ClientSession | None = None


def session() -> aiohttp.ClientSession:
    global _session
    if _session is None:
        _session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=200))
    return _session


class BareProxy(AsyncHttpConsumer):
    async def handle(self, body: bytes) -> None:
        url = ENGINE_URL + self.scope["path"]
        async with session().post(
            url, data=body, headers={"Content-Type": "application/json"}
        ) as resp:
            if resp.content_type != "text/event-stream":
                await self.send_response(resp.status, await resp.read(), headers=JSON)
                return
            await self.send_headers(
                status=resp.status, headers=[(b"content-type", b"text/event-stream")]
            )
            async for chunk in resp.content.iter_any():
                await self.send_body(chunk, more_body=True)
            await self.send_body(b"")


application = URLRouter([path("v1/chat/completions", BareProxy.as_asgi())])
