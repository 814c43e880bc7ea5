"""Counting tokens: exactly through llama.cpp's /tokenize, else a documented heuristic.

The heuristic (HEURISTIC_CHARS_PER_TOKEN characters a token, plus MESSAGE_OVERHEAD_TOKENS
per chat message for the role markers a chat template adds) is what OpenAI documents as a
rule of thumb for English; it is used for engines without a tokenizer endpoint and when
the engine cannot be asked.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp

from apps.engines.client import engine_session, engine_url
from apps.engines.registry import EngineRoute

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


async def _llamacpp_tokens(engine: EngineRoute, text: str) -> int:
    async with engine_session().post(
        engine_url(engine.base_url, "/tokenize"),
        json={"content": text, "add_special": False},
        timeout=TOKENIZE_TIMEOUT,
    ) as resp:
        resp.raise_for_status()
        return len((await resp.json())["tokens"])


async def count_message_tokens(engine: EngineRoute, messages: list[dict[str, Any]]) -> list[int]:
    """Tokens of each chat message, template overhead included."""
    if engine.flavor != "llamacpp" or not messages:
        return [heuristic_message_tokens(m) for m in messages]
    texts = [message_text(m) for m in messages]
    try:
        counts = await asyncio.gather(*(_llamacpp_tokens(engine, text) for text in texts))
    except (TimeoutError, aiohttp.ClientError, KeyError, ValueError) as exc:
        logger.warning("tokenize on %s failed (%s); using the heuristic", engine.name, exc)
        return [heuristic_message_tokens(m) for m in messages]
    return [count + MESSAGE_OVERHEAD_TOKENS for count in counts]
