"""Counting tokens: exactly through llama.cpp's /tokenize, else a documented heuristic.

The heuristic (HEURISTIC_CHARS_PER_TOKEN characters a token, plus MESSAGE_OVERHEAD_TOKENS
per chat message for the role markers a chat template adds) is what OpenAI documents as a
rule of thumb for English; it is used for engines without a tokenizer endpoint and when
the engine cannot be asked.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import aiohttp

from apps.engines.client import engine_session, engine_url
from apps.engines.manager import engine_manager
from apps.engines.registry import EngineRoute, VariantRoute

HEURISTIC_CHARS_PER_TOKEN = 4
MESSAGE_OVERHEAD_TOKENS = 4
TOKENIZE_TIMEOUT = aiohttp.ClientTimeout(total=5)

logger = logging.getLogger(__name__)


def message_text(message: dict[str, Any]) -> str:
    """The text a chat message contributes: its content (string or text parts), tool calls."""
    content = message.get("content")
    if isinstance(content, list):
        content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    parts = [content if isinstance(content, str) else ""]
    for call in message.get("tool_calls") or []:
        if isinstance(call, dict):
            function = call.get("function") or {}
            parts.append(f"{function.get('name', '')} {function.get('arguments', '')}")
    return " ".join(part for part in parts if part)


def heuristic_tokens(text: str) -> int:
    return -(-len(text) // HEURISTIC_CHARS_PER_TOKEN)  # ceiling division


def heuristic_message_tokens(message: dict[str, Any]) -> int:
    return heuristic_tokens(message_text(message)) + MESSAGE_OVERHEAD_TOKENS


async def counting_url(variant: VariantRoute) -> str | None:
    """Where the model's tokenizer answers (llama.cpp's /tokenize and /apply-template): an
    external engine's first replica, or a managed process that runs a variant of the same
    model (never started just to count). None: count with the heuristic."""
    engine = variant.engine
    if engine.flavor != "llamacpp":
        return None
    if not engine.managed:
        return engine.base_urls[0] if engine.base_urls else engine.base_url
    return await engine_manager.serving_url(variant_ids=variant.model_variant_ids or (variant.id,))


def tokenizer_headers(engine: EngineRoute) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if engine.upstream_api_key:
        # llama-server's --api-key guards /tokenize and /apply-template too.
        headers["Authorization"] = f"Bearer {engine.upstream_api_key}"
    return headers


async def _llamacpp_tokens(engine: EngineRoute, base_url: str, text: str) -> int:
    async with engine_session().post(
        engine_url(base_url, "/tokenize"),
        json={"content": text, "add_special": False},
        headers=tokenizer_headers(engine),
        timeout=TOKENIZE_TIMEOUT,
    ) as resp:
        resp.raise_for_status()
        return len((await resp.json())["tokens"])


@dataclass(frozen=True, slots=True)
class MessageTokens:
    counts: list[int]  # per message, template overhead included
    exact: bool  # counted by the engine's tokenizer, not the heuristic


async def count_message_tokens(
    variant: VariantRoute, messages: list[dict[str, Any]]
) -> MessageTokens:
    """Tokens of each chat message, template overhead included."""
    base_url = await counting_url(variant) if messages else None
    if base_url is None:
        return MessageTokens([heuristic_message_tokens(m) for m in messages], exact=False)
    engine = variant.engine
    texts = [message_text(m) for m in messages]
    try:
        counts = await asyncio.gather(*(_llamacpp_tokens(engine, base_url, t) for t in texts))
    except (TimeoutError, aiohttp.ClientError, KeyError, ValueError) as exc:
        logger.warning("tokenize on %s failed (%s); using the heuristic", engine.name, exc)
        return MessageTokens([heuristic_message_tokens(m) for m in messages], exact=False)
    return MessageTokens([count + MESSAGE_OVERHEAD_TOKENS for count in counts], exact=True)
