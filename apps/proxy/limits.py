"""Input limits per /v1 request (settings LIMIT_*): a clear OpenAI-shaped 400 for a request
too large to be worth sending to an engine, before any quota or engine work.

The checks read only the parsed payload and the registry's snapshot (no database): the
number of messages, the characters of all content, `n`, the number of tools, and
`max_tokens` against the model's largest context.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings

from apps.core.context import RequestContext
from apps.core.errors import ApiError, invalid_request


def content_chars(payload: dict[str, Any], endpoint: str) -> int:
    """Characters of what the client sends as text: message contents (string or text
    parts), a completion's prompt, an embedding's input."""
    if endpoint == "chat.completions":
        return sum(_message_chars(m) for m in payload.get("messages") or ())
    value = payload.get("prompt" if endpoint == "completions" else "input")
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(len(item) for item in value if isinstance(item, str))
    return 0


def _message_chars(message: Any) -> int:
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(
            len(part["text"])
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return 0


def _too_many(what: str, count: int, limit: int, param: str) -> ApiError:
    return ApiError(
        400,
        f"Too many {what}: {count}, at most {limit} per request.",
        code="request_too_large",
        param=param,
    )


def _check_counts(payload: dict[str, Any]) -> None:
    messages = payload.get("messages")
    if isinstance(messages, list) and len(messages) > settings.LIMIT_MAX_MESSAGES:
        raise _too_many("messages", len(messages), settings.LIMIT_MAX_MESSAGES, "messages")
    tools = payload.get("tools")
    if isinstance(tools, list) and len(tools) > settings.LIMIT_MAX_TOOLS:
        raise _too_many("tools", len(tools), settings.LIMIT_MAX_TOOLS, "tools")
    n = payload.get("n")
    if isinstance(n, int) and not isinstance(n, bool):
        if n < 1:
            raise invalid_request("`n` must be at least 1.", param="n")
        if n > settings.LIMIT_MAX_N:
            raise invalid_request(f"`n` must be at most {settings.LIMIT_MAX_N}.", param="n")


def _check_max_tokens(ctx: RequestContext) -> None:
    """`max_tokens` (or `max_completion_tokens`) above the model's largest context can never
    be served; a model whose context is unknown is not checked."""
    assert ctx.route is not None
    sizes = [v.ctx_size for v in ctx.route.variants]
    if not sizes or None in sizes:
        return
    largest = max(s for s in sizes if s is not None)
    for name in ("max_completion_tokens", "max_tokens"):
        value = ctx.payload.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > largest:
            raise ApiError(
                400,
                f"`{name}` is {value}, but the model `{ctx.route.name}` has a context of "
                f"{largest} tokens.",
                code="context_length_exceeded",
                param=name,
            )


async def input_limits(ctx: RequestContext) -> None:
    """The stage: after resolve_model (the context size is the model's)."""
    _check_counts(ctx.payload)
    chars = content_chars(ctx.payload, ctx.endpoint)
    if chars > settings.LIMIT_MAX_CONTENT_CHARS:
        param = {"chat.completions": "messages", "completions": "prompt"}.get(ctx.endpoint, "input")
        raise ApiError(
            400,
            f"The request's content has {chars} characters, at most "
            f"{settings.LIMIT_MAX_CONTENT_CHARS} are allowed.",
            code="request_too_large",
            param=param,
        )
    if ctx.endpoint != "embeddings":
        _check_max_tokens(ctx)
