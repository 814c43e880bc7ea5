"""The /v1 endpoints: thin Channels consumers over the pipelines (pipeline.py).

A request that runs longer than a moment gets a watcher task on the client connection
(DisconnectWatch): when the client disconnects, the request's task is cancelled, which
closes the upstream request at once (Channels' AsyncHttpConsumer alone would not notice a
disconnect while it streams).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
from channels.generic.http import AsyncHttpConsumer
from django.conf import settings

from apps.core.context import RequestContext
from apps.core.errors import ApiError
from apps.engines.registry import ModelRoute, registry
from apps.engines.stage import allowed_route
from apps.observability import tracing
from apps.proxy.pipeline import (
    CHAT_COMPLETIONS,
    COMPLETIONS,
    EMBEDDINGS,
    Pipeline,
    run_pipeline,
    settle,
)
from apps.proxy.responder import Responder
from apps.proxy.sse import DONE_EVENT, error_event
from apps.tenants.auth import Principal, identify, require_active
from apps.tenants.rate_limits import rate_limit_check

logger = logging.getLogger(__name__)

JSON_HEADERS = [(b"content-type", b"application/json")]


async def _read_body(receive: Any) -> bytes | None:
    """The whole request body, or None if the client left first (or sent too much)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > settings.MAX_REQUEST_BYTES:
            raise ApiError(
                413,
                f"Request body exceeds {settings.MAX_REQUEST_BYTES} bytes.",
                code="request_too_large",
            )
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


class DisconnectWatch:
    """Cancels the request's task (the current one) when its client disconnects.

    The watcher task starts only once the request has run for WATCH_AFTER_SECONDS: most
    requests are over by then, and a task per request is a measurable share of a short
    one's CPU (bench/README.md). A client that left earlier is still seen at once then
    (uvicorn answers `http.disconnect` to a receive after it), so the engine's work stops
    at most that much later."""

    WATCH_AFTER_SECONDS = 0.05

    def __init__(self, receive: Any) -> None:
        self._receive = receive
        self._request = asyncio.current_task()
        self._watcher: asyncio.Task | None = None
        self.cancelled_request = False
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.WATCH_AFTER_SECONDS, self._start, loop)

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._watcher = loop.create_task(self._watch())

    async def _watch(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        assert self._request is not None
        self.cancelled_request = True
        self._request.cancel()

    def stop(self) -> None:
        self._timer.cancel()
        if self._watcher is not None:
            self._watcher.cancel()


class V1Consumer(AsyncHttpConsumer):
    """Base: method check, JSON errors, and the disconnect-cancels-work rule."""

    methods: tuple[str, ...] = ("POST",)
    response_started = False
    response_is_stream = False  # the headers sent said text/event-stream
    response_finished = False  # the last body message (more_body False) was sent

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        self.scope = scope
        self.base_send = send
        try:
            body = await _read_body(receive)
        except ApiError as err:
            await self.send_error(err)
            return
        if body is None:
            return
        watch = DisconnectWatch(receive)
        try:
            await self.respond(body)
        except asyncio.CancelledError:
            if not watch.cancelled_request:
                raise  # cancelled by the server (shutdown), not by the client leaving
        finally:
            watch.stop()

    async def respond(self, body: bytes) -> None:
        if self.scope["method"] not in self.methods:
            await self.send_error(
                ApiError(
                    405,
                    f"Method {self.scope['method']} is not allowed here.",
                    code="method_not_allowed",
                )
            )
            return
        try:
            await self.handle(body)
        except ApiError as err:
            await self.fail(err)
        except Exception:
            logger.exception("unhandled error on %s", self.scope["path"])
            await self.fail(
                ApiError(
                    500,
                    "The gateway failed to handle this request.",
                    type="api_error",
                    code="internal_error",
                )
            )

    async def fail(self, err: ApiError) -> None:
        """Answer with `err`; if the response has already started, end it cleanly instead.

        Once headers are out the status cannot change: a stream gets an error event and
        [DONE] (what OpenAI clients expect of a failed stream), any other body is closed so
        the client is not left waiting on a half-written response."""
        if not self.response_started:
            await self.send_error(err)
        elif self.response_is_stream and not self.response_finished:
            await self.send_body(error_event(err.payload()) + DONE_EVENT)
        elif not self.response_finished:
            await self.send_body(b"")

    async def send_headers(self, *, status: int = 200, headers: Any = None) -> None:
        self.response_started = True
        self.response_is_stream = any(
            name.lower() == b"content-type" and value.startswith(b"text/event-stream")
            for name, value in headers or ()
        )
        await super().send_headers(status=status, headers=headers)

    async def send_body(self, body: bytes, *, more_body: bool = False) -> None:
        await super().send_body(body, more_body=more_body)
        if not more_body:
            self.response_finished = True

    async def identify(self) -> Principal:
        """Whose key this is (401 otherwise); nothing else is checked yet."""
        return await identify(self.header(b"authorization"))

    async def admit(self, principal: Principal) -> None:
        """Refuse an inactive tenant (403); count the request against its rate limits (429)."""
        require_active(principal)
        await rate_limit_check(principal)

    async def authorize(self) -> Principal:
        """Authenticate the caller's key and count the request against its rate limits."""
        principal = await self.identify()
        await self.admit(principal)
        return principal

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.scope["headers"]:
            if key == name:
                return value
        return None

    async def send_json(self, status: int, payload: Any, headers: list | None = None) -> None:
        await self.send_response(
            status, orjson.dumps(payload), headers=JSON_HEADERS + (headers or [])
        )

    async def send_error(self, err: ApiError) -> None:
        await self.send_response(err.status, err.body(), headers=JSON_HEADERS + err.headers)


class ProxyConsumer(V1Consumer):
    """POST endpoints relayed to an engine, each through its pipeline (pipeline.py)."""

    pipeline: Pipeline

    async def handle(self, body: bytes) -> None:
        ctx = RequestContext(
            endpoint=self.pipeline.endpoint, headers=self.scope["headers"], body=body
        )
        if tracing.tracer is None:
            return await self.run_request(ctx)
        with tracing.request_span(ctx.endpoint, ctx.headers) as span:
            try:
                await self.run_request(ctx)
            finally:
                tracing.finish_request(span, ctx)

    async def run_request(self, ctx: RequestContext) -> None:
        try:
            await run_pipeline(self.pipeline, ctx, self.responder())
        except ApiError as err:
            ctx.status, ctx.error_code = err.status, err.code or err.type
            await self.refused(ctx, err)
            raise
        except asyncio.CancelledError:
            ctx.client_disconnected = True
            ctx.status = ctx.status or 499  # nginx's "client closed request"
            if not ctx.usage_recorded and ctx.engine:
                ctx.record_usage(None)  # the engine got the prompt; count it
            raise
        except Exception:
            # respond() answers it as a 500 (or ends a started response with an error).
            ctx.status, ctx.error_code = 500, "internal_error"
            raise
        finally:
            settle(ctx)
            ctx.release()

    @staticmethod
    async def refused(ctx: RequestContext, err: ApiError) -> None:
        """The stages' hooks on a refusal (the session stores it); a failure there must not
        hide the refusal itself from the client."""
        try:
            await ctx.refused(err)
        except Exception:
            logger.exception("storing a refusal failed")

    def responder(self) -> Responder:
        return Responder(send_headers=self.send_headers, send_body=self.send_body)


class ChatCompletionsConsumer(ProxyConsumer):
    pipeline = CHAT_COMPLETIONS


class CompletionsConsumer(ProxyConsumer):
    pipeline = COMPLETIONS


class EmbeddingsConsumer(ProxyConsumer):
    pipeline = EMBEDDINGS


def _model_object(route: ModelRoute) -> dict[str, Any]:
    return {
        "id": route.name,
        "object": "model",
        "created": route.created,
        "owned_by": route.owned_by,
    }


class ModelsConsumer(V1Consumer):
    methods = ("GET",)

    async def handle(self, body: bytes) -> None:
        principal = await self.authorize()
        models = (await registry.get()).models.values()
        data = [_model_object(route) for route in models if principal.may_use(route.id)]
        await self.send_json(200, {"object": "list", "data": sorted(data, key=lambda m: m["id"])})


class ModelDetailConsumer(V1Consumer):
    methods = ("GET",)

    async def handle(self, body: bytes) -> None:
        principal = await self.authorize()
        name = self.scope["url_route"]["kwargs"]["model_id"]
        await self.send_json(200, _model_object(await allowed_route(principal, name)))


class NotFoundConsumer(V1Consumer):
    """Any other path under /v1: an OpenAI-shaped 404 (never Django's HTML page)."""

    methods = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")

    async def handle(self, body: bytes) -> None:
        raise ApiError(
            404,
            f"Unknown endpoint {self.scope['method']} {self.scope['path']}.",
            code="unknown_url",
        )
