"""The /v1 endpoints: thin Channels consumers over the pipeline stages.

Each request has a watcher task on the client connection: when the client disconnects,
the request's task is cancelled, which closes the upstream request at once (Channels'
AsyncHttpConsumer alone would not notice a disconnect while it streams).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

import orjson
from channels.generic.http import AsyncHttpConsumer
from django.conf import settings

from apps.core.errors import ApiError, model_not_found
from apps.engines.registry import ModelRoute, VariantRoute, registry
from apps.engines.scheduler import SchedulerBusy
from apps.engines.scheduler_service import worker_scheduler
from apps.engines.sizing import (
    TOKENIZE,
    heuristic_prompt_tokens,
    prompt_token_bound,
    prompt_tokens,
)
from apps.engines.transforms import (
    ToolCallStreamParser,
    adapt_response_format,
    tool_calls_in_response,
    wants_tool_parsing,
)
from apps.proxy import validation
from apps.proxy.engine_stage import replica_order, replica_url, size_and_choose
from apps.proxy.exchange import Exchange
from apps.proxy.session_stage import session_id_of, session_prepare, session_record
from apps.proxy.sse import DONE_EVENT, SseRelay, error_event
from apps.proxy.upstream import forward
from apps.quotas.pipeline import (
    principal_quotas,
    quota_headers,
    quota_stage_reserve,
    quota_stage_settle,
    tokens_to_reserve,
)
from apps.request_logs.writer import request_log_writer
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


async def _cancel_on_disconnect(receive: Any, task: asyncio.Task) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    task.cancel()


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
        # The request runs in this task; a watcher cancels it if the client disconnects.
        watcher = asyncio.ensure_future(_cancel_on_disconnect(receive, asyncio.current_task()))
        try:
            await self.respond(body)
        except asyncio.CancelledError:
            if not watcher.done():
                raise  # cancelled by the server (shutdown), not by the client leaving
        finally:
            watcher.cancel()

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


def largest_variant(route: ModelRoute) -> VariantRoute:
    """The variant with the most context (unknown size counts as unbounded)."""
    return max(route.variants, key=lambda v: v.ctx_size if v.ctx_size else float("inf"))


async def resolve_model(principal: Principal, name: str) -> ModelRoute:
    route = (await registry.get()).find(name)
    if route is None or not route.variants or not principal.may_use(route.id):
        raise model_not_found(name)
    return route


class ProxyConsumer(V1Consumer):
    """POST endpoints relayed to an engine: chat completions, completions, embeddings."""

    endpoint = ""
    upstream_path = ""
    streams = True

    def validate(self, payload: dict[str, Any]) -> None:
        raise NotImplementedError

    async def handle(self, body: bytes) -> None:
        ex = Exchange(endpoint=self.endpoint)
        try:
            await self.proxy(ex, body)
        except ApiError as err:
            ex.status, ex.error_code = err.status, err.code or err.type
            raise
        except asyncio.CancelledError:
            ex.client_disconnected = True
            ex.status = ex.status or 499  # nginx's "client closed request"
            if not ex.usage_recorded and ex.engine:
                ex.record_usage(None)  # the engine got the prompt; count it
            raise
        except Exception:
            # respond() answers it as a 500 (or ends a started response with an error).
            ex.status, ex.error_code = 500, "internal_error"
            raise
        finally:
            spent = ex.prompt_tokens + ex.completion_tokens if ex.usage_recorded else 0
            quota_stage_settle(ex.quota_ticket, actual_tokens=spent)
            if ex.principal is not None:
                request_log_writer.add(ex.to_log_row())

    async def proxy(self, ex: Exchange, body: bytes) -> None:
        # Known before it is admitted, so refused requests (403, 429) are logged too.
        ex.principal = await self.identify()
        await self.admit(ex.principal)
        payload = validation.parse_json_object(body)
        self.validate(payload)
        route = await resolve_model(ex.principal, payload["model"])
        ex.model = route.name
        rewritten = await self.prepare(ex, payload, largest_variant(route))
        variant = await self.choose_variant(ex, payload, route)
        ex.engine = variant.engine.name
        rewritten |= self.adapt(ex, payload, variant)
        if payload["model"] != route.name:  # an alias or a tier: the engine knows the name
            payload["model"] = route.name
            rewritten = True
        ex.prompt_estimate = ex.prompt_estimate or heuristic_prompt_tokens(payload, self.endpoint)
        if principal_quotas(ex.principal):
            await self.reserve_quota(ex, payload, variant)
        relay = None
        if self.streams and payload.get("stream") is True:
            ex.stream = True
            relay = self._ask_for_usage(
                payload, collect_reply=ex.wants_reply, tool_parser=self.stream_tool_parser(payload)
            )
            rewritten = True
        await self.call_engine(ex, payload, variant, body=None if rewritten else body, relay=relay)

    async def call_engine(
        self,
        ex: Exchange,
        payload: dict[str, Any],
        variant: VariantRoute,
        *,
        body: bytes | None,
        relay: SseRelay | None,
    ) -> None:
        """Wait for a slot on a replica (fair across tenants), then forward to it."""
        assert ex.principal is not None
        engine = variant.engine
        try:
            async with worker_scheduler().slot(
                engine.name,
                replicas=engine.replicas,
                slots=engine.slots,
                tenant=ex.principal.tenant_slug,
                weight=ex.principal.tenant_weight,
                session=self.session_id,
                # Waiting for the session's own slot pays only when its cached history
                # would take longer to recompute than someone else's answer takes.
                insist=self.history_tokens >= settings.SCHEDULER_STICKY_MIN_TOKENS,
                max_queue=settings.SCHEDULER_MAX_QUEUE,
                max_wait=settings.SCHEDULER_MAX_WAIT_SECONDS,
                replica_order=await replica_order(variant),
            ) as placement:
                if self.session_id and engine.flavor == "llamacpp" and "id_slot" not in payload:
                    payload["id_slot"] = placement.slot  # the same llama.cpp slot: its KV cache
                    body = None
                async with replica_url(variant, placement.replica) as base_url:
                    await forward(
                        self,
                        ex,
                        engine=engine,
                        base_url=base_url,
                        path=self.upstream_path,
                        body=body if body is not None else orjson.dumps(payload),
                        client_headers=self.scope["headers"],
                        relay=relay,
                    )
        except SchedulerBusy as busy:
            raise ApiError(
                503,
                f"Engine `{engine.name}` is busy ({busy.reason.replace('_', ' ')}); retry in {busy.retry_after}s.",
                type="api_error",
                code="engine_overloaded",
                headers=[(b"retry-after", str(busy.retry_after).encode())],
            ) from None

    session_id: str | None = None
    history_tokens = 0  # of the session history sent along (prepare)

    async def prepare(self, ex: Exchange, payload: dict[str, Any], variant: VariantRoute) -> bool:
        """Endpoint-specific stages before sizing (`variant`: the model's largest); True if
        `payload` changed."""
        return False

    async def choose_variant(
        self, ex: Exchange, payload: dict[str, Any], route: ModelRoute
    ) -> VariantRoute:
        """The variant to use; endpoints that generate pick the smallest that fits."""
        return route.variants[0]

    def adapt(self, ex: Exchange, payload: dict[str, Any], variant: VariantRoute) -> bool:
        """Engine-specific request changes once the variant is known; True if changed."""
        return False

    def stream_tool_parser(self, payload: dict[str, Any]) -> ToolCallStreamParser | None:
        return None

    async def reserve_quota(
        self, ex: Exchange, payload: dict[str, Any], variant: VariantRoute
    ) -> None:
        """Reserve the most this request can cost (429 if a quota cannot cover it).

        The prompt counts as sizing counted it, else as an upper bound of it (its bytes),
        else the heuristic, so the engine is not asked on every request. Only when that
        does not fit is the engine's tokenizer asked, and the exact count tried, so a quota
        that is nearly used up still admits what really fits."""
        prompt = ex.prompt_estimate
        if not ex.prompt_counted:
            prompt = max(prompt, prompt_token_bound(payload, self.endpoint) or 0)
        try:
            await self._reserve(ex, payload, variant, prompt)
        except ApiError as err:
            if err.code != "insufficient_quota" or ex.prompt_counted:
                raise
            exact, method = await prompt_tokens(variant, payload, self.endpoint, model=ex.model)
            if method != TOKENIZE or exact >= prompt:
                raise
            ex.prompt_estimate, ex.prompt_counted = exact, True
            await self._reserve(ex, payload, variant, exact)

    async def _reserve(
        self, ex: Exchange, payload: dict[str, Any], variant: VariantRoute, prompt: int
    ) -> None:
        assert ex.principal is not None
        tokens = tokens_to_reserve(
            payload, prompt_tokens=prompt, ctx_size=variant.ctx_size, completes=self.streams
        )
        ex.quota_ticket = await quota_stage_reserve(
            tenant_id=ex.principal.tenant_id,
            api_key_id=ex.principal.key_id,
            tokens=tokens,
            quotas=list(principal_quotas(ex.principal)),
        )
        ex.response_headers += quota_headers(ex.quota_ticket.states)

    @staticmethod
    def _ask_for_usage(
        payload: dict[str, Any], *, collect_reply: bool, tool_parser: ToolCallStreamParser | None
    ) -> SseRelay:
        """Always have the engine report usage; the client sees it only if it asked."""
        options = payload.get("stream_options") or {}
        payload["stream_options"] = {**options, "include_usage": True}
        return SseRelay(
            client_wants_usage=options.get("include_usage") is True,
            collect_reply=collect_reply,
            tool_parser=tool_parser,
        )


class GeneratingConsumer(ProxyConsumer):
    """Chat and text completions: sized against the model's variants, JSON constraints."""

    async def choose_variant(
        self, ex: Exchange, payload: dict[str, Any], route: ModelRoute
    ) -> VariantRoute:
        tokens, variant = await size_and_choose(payload, route=route, endpoint=self.endpoint)
        ex.prompt_estimate, ex.prompt_counted = tokens, tokens > 0
        return variant

    def adapt(self, ex: Exchange, payload: dict[str, Any], variant: VariantRoute) -> bool:
        return adapt_response_format(payload, variant.engine.flavor)


class ChatCompletionsConsumer(GeneratingConsumer):
    endpoint = "chat.completions"
    upstream_path = "/v1/chat/completions"
    validate = staticmethod(validation.validate_chat)

    async def prepare(self, ex: Exchange, payload: dict[str, Any], variant: VariantRoute) -> bool:
        if wants_tool_parsing(payload):
            ex.rewrite_response = _with_tool_calls
        self.session_id = session_id_of(self.header(b"x-session-id"), payload)
        if self.session_id is None:
            return False
        turn = await session_prepare(
            ex=ex, external_id=self.session_id, payload=payload, variant=variant
        )
        ex.before_finish = functools.partial(session_record, ex=ex, turn=turn)
        self.history_tokens = turn.history_tokens
        ex.response_headers.append((b"x-session-id", self.session_id.encode()))
        return True

    def stream_tool_parser(self, payload: dict[str, Any]) -> ToolCallStreamParser | None:
        return ToolCallStreamParser() if wants_tool_parsing(payload) else None


def _with_tool_calls(body: Any) -> Any:
    """A whole chat completion with `<tool_call>` text turned into OpenAI tool_calls."""
    if isinstance(body, dict):
        tool_calls_in_response(body)
    return body


class CompletionsConsumer(GeneratingConsumer):
    endpoint = "completions"
    upstream_path = "/v1/completions"
    validate = staticmethod(validation.validate_completion)


class EmbeddingsConsumer(ProxyConsumer):
    endpoint = "embeddings"
    upstream_path = "/v1/embeddings"
    streams = False
    validate = staticmethod(validation.validate_embedding)


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
        await self.send_json(200, _model_object(await resolve_model(principal, name)))


class NotFoundConsumer(V1Consumer):
    """Any other path under /v1: an OpenAI-shaped 404 (never Django's HTML page)."""

    methods = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")

    async def handle(self, body: bytes) -> None:
        raise ApiError(
            404,
            f"Unknown endpoint {self.scope['method']} {self.scope['path']}.",
            code="unknown_url",
        )
