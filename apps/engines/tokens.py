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
import orjson

from apps.engines.client import engine_session, engine_url
from apps.engines.manager import engine_manager
from apps.engines.registry import EngineRoute, VariantRoute

HEURISTIC_CHARS_PER_TOKEN = 4
MESSAGE_OVERHEAD_TOKENS = 4
# Counting sits in front of requests: an engine slower than this to count is treated as
# unable to (heuristic), rather than delaying the request. llama-server and vLLM answer
# /tokenize from their HTTP threads, not queued behind generation.
TOKENIZE_TIMEOUT = aiohttp.ClientTimeout(total=2.0, sock_connect=1.0)
# /tokenize is called without special tokens, so the BOS token the engine puts before
# every prompt is not in the count. Counting it for models that have none (Qwen, ...)
# overestimates by one token, the safe direction.
BOS_TOKENS = 1
# Fields of a chat request that change the rendered prompt (tools are rendered into it).
TEMPLATE_FIELDS = ("tools", "tool_choice", "chat_template_kwargs", "parallel_tool_calls")
TOKENIZER_ERRORS = (TimeoutError, aiohttp.ClientError, KeyError, TypeError, ValueError)

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


COUNTING_FLAVORS = ("llamacpp", "vllm")  # engines that count tokens for us


async def counting_url(variant: VariantRoute) -> str | None:
    """Where the model's tokenizer answers: an external engine's first replica, or a
    managed process that runs a variant of the same model (never started just to count).
    None: count with the heuristic."""
    engine = variant.engine
    if engine.flavor not in COUNTING_FLAVORS:
        return None
    if not engine.managed:
        return engine.base_urls[0] if engine.base_urls else engine.base_url
    return await engine_manager.serving_url(variant_ids=variant.model_variant_ids or (variant.id,))


class Tokenizer:
    """The engine's own tokenizer: llama.cpp's /tokenize (+ /apply-template for chats),
    or vLLM's /tokenize (which renders chats itself and needs the model's name)."""

    def __init__(self, engine: EngineRoute, base_url: str, model: str) -> None:
        self.engine = engine
        self.base_url = base_url
        self.model = model

    async def text_tokens(self, text: str) -> int:
        """Tokens of `text` alone, without BOS or other special tokens."""
        if self.engine.flavor == "vllm":
            body = {"model": self.model, "prompt": text, "add_special_tokens": False}
            return _count(await self._post_json("/tokenize", body), "count")
        answer = await self._post_json("/tokenize", {"content": text, "add_special": False})
        return _count(answer, "tokens")

    async def chat_tokens(self, payload: dict[str, Any]) -> int:
        """Tokens of a chat request's whole prompt, as the chat template renders it."""
        extra = {k: payload[k] for k in TEMPLATE_FIELDS if payload.get(k) is not None}
        if self.engine.flavor == "vllm":
            body = {"model": self.model, "messages": payload["messages"], **extra}
            body["add_generation_prompt"] = True
            return _count(await self._post_json("/tokenize", body), "count")
        rendered = await self._post_json(
            "/apply-template", {"messages": payload["messages"], **extra}
        )
        prompt = rendered["prompt"]
        if not isinstance(prompt, str):
            raise TypeError("/apply-template returned no prompt string")
        # llama.cpp's /tokenize leaves out the BOS the engine puts before every prompt.
        return await self.text_tokens(prompt) + BOS_TOKENS

    async def _post_json(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        async with engine_session().post(
            engine_url(self.base_url, path),
            data=orjson.dumps(body),
            headers=tokenizer_headers(self.engine),
            timeout=TOKENIZE_TIMEOUT,
        ) as resp:
            resp.raise_for_status()
            answer = orjson.loads(await resp.read())
        if not isinstance(answer, dict):
            raise TypeError(f"{path} did not return a JSON object")
        return answer


def _count(answer: dict[str, Any], key: str) -> int:
    value = answer[key]
    if key == "tokens" and isinstance(value, list):
        return len(value)
    if key == "count" and isinstance(value, int):
        return value
    raise TypeError(f"/tokenize returned no {key}")


def tokenizer_headers(engine: EngineRoute) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if engine.upstream_api_key:
        # llama-server's --api-key guards /tokenize and /apply-template too.
        headers["Authorization"] = f"Bearer {engine.upstream_api_key}"
    return headers


@dataclass(frozen=True, slots=True)
class MessageTokens:
    counts: list[int]  # per message, template overhead included
    exact: bool  # counted by the engine's tokenizer, not the heuristic


async def count_message_tokens(
    variant: VariantRoute, messages: list[dict[str, Any]], *, model: str
) -> MessageTokens:
    """Tokens of each chat message, template overhead included."""
    base_url = await counting_url(variant) if messages else None
    if base_url is None:
        return MessageTokens([heuristic_message_tokens(m) for m in messages], exact=False)
    tokenizer = Tokenizer(variant.engine, base_url, model)
    texts = [message_text(m) for m in messages]
    try:
        counts = await asyncio.gather(*(tokenizer.text_tokens(text) for text in texts))
    except TOKENIZER_ERRORS as exc:
        logger.warning("tokenize on %s failed (%r); using the heuristic", variant.engine.name, exc)
        return MessageTokens([heuristic_message_tokens(m) for m in messages], exact=False)
    return MessageTokens([count + MESSAGE_OVERHEAD_TOKENS for count in counts], exact=True)
