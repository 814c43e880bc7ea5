"""How big is a request, and which variant of a model has the context to serve it.

Prompt size is measured exactly where the engine can tell us (llama.cpp: render the chat
template with /apply-template, count it with /tokenize; vLLM: its /tokenize) and estimated
otherwise with the documented heuristic of apps.engines.tokens. Choosing a variant is pure: the smallest
context that holds prompt + completion budget.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import orjson

from apps.core.context import NO_HISTORY, SessionHistory, messages_with_history
from apps.engines.registry import VariantRoute
from apps.engines.tokens import (
    BOS_TOKENS,
    TOKENIZER_ERRORS,
    Tokenizer,
    counting_url,
    heuristic_message_tokens,
    heuristic_tokens,
)

logger = logging.getLogger(__name__)

TOKENIZE = "tokenize"
HEURISTIC = "heuristic"

# What the heuristic adds for a chat: the template's opening of the assistant's turn.
ASSISTANT_PRIMING_TOKENS = 3
# Generous bounds on what a chat template adds around the messages (role markers,
# BOS, the assistant's opening, a default system header such as Llama 3's dates).
TEMPLATE_TOKENS_PER_MESSAGE = 16
TEMPLATE_TOKENS = 64

PromptPiece = str | int  # text, or a token id the client sent directly


class ContextTooLarge(Exception):
    """No variant of the model has a context large enough for this request.

    Map it to HTTP 400 with code `context_length_exceeded` (OpenAI's code for this case).
    """

    code = "context_length_exceeded"

    def __init__(
        self,
        needed: int,
        sizes: Sequence[int],
        *,
        prompt_tokens: int | None = None,
        model: str = "",
    ) -> None:
        self.needed = needed
        self.sizes = sorted(set(sizes))
        self.prompt_tokens = prompt_tokens
        self.model = model
        super().__init__(self._message())

    def _message(self) -> str:
        breakdown = ""
        if self.prompt_tokens is not None:
            completion = self.needed - self.prompt_tokens
            breakdown = f" ({self.prompt_tokens} prompt + {completion} max_tokens)"
        model = f" of model `{self.model}`" if self.model else ""
        largest = self.sizes[-1] if self.sizes else 0
        variants = ", ".join(str(size) for size in self.sizes)
        return (
            f"This request needs {self.needed} tokens{breakdown} but the largest context"
            f"{model} is {largest} tokens (variants: {variants})."
        )


# --- variants ----------------------------------------------------------------------------


def fitting_variants(variants: Sequence[VariantRoute], needed: int) -> list[VariantRoute]:
    """The variants that can take `needed` tokens, best first.

    Sized variants that fit come first, smallest context first (the big ones stay free for
    the requests that need them); variants of unknown size (ctx_size None) follow, since
    they may fit but nothing says so. Equal sizes keep their given order.
    """
    sized = [v for v in variants if v.ctx_size is not None and v.ctx_size >= needed]
    sized.sort(key=lambda v: v.ctx_size or 0)
    return sized + [v for v in variants if v.ctx_size is None]


def choose_variant(
    variants: Sequence[VariantRoute],
    needed: int,
    *,
    prompt_tokens: int | None = None,
    model: str = "",
) -> VariantRoute:
    """The smallest variant whose context holds `needed` tokens (prompt + completion).

    `prompt_tokens` and `model` only make the ContextTooLarge message more helpful.
    """
    if not variants:
        raise ValueError("a model without variants cannot serve requests")
    fitting = fitting_variants(variants, needed)
    if not fitting:
        sizes = [v.ctx_size for v in variants if v.ctx_size is not None]
        raise ContextTooLarge(needed, sizes, prompt_tokens=prompt_tokens, model=model)
    return fitting[0]


def completion_budget(payload: dict[str, Any], default: int) -> int:
    """The tokens the client lets the answer take: max_completion_tokens (OpenAI's current
    name) over max_tokens (the older one), else `default`."""
    for name in ("max_completion_tokens", "max_tokens"):
        value = payload.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return default


# --- prompt size -------------------------------------------------------------------------


async def prompt_tokens(
    variant: VariantRoute,
    payload: dict[str, Any],
    endpoint: str,
    *,
    model: str,
    history: SessionHistory = NO_HISTORY,
) -> tuple[int, str]:
    """(tokens, method) of the request's prompt; method is "tokenize" or "heuristic".

    `endpoint` is the Exchange endpoint ("chat.completions", "completions", ...); `model`
    the name the engine knows (vLLM checks it). Only llama.cpp and vLLM engines are asked,
    and only a process that already runs the model (see tokens.counting_url): a managed
    engine that is not started yet must not be woken up (or waited for) just to size a
    request. For a batch of prompts, the largest one counts: each runs in its own slot.
    A session's `history` is counted with the messages, where the engine gets it (parsed
    here: counting already costs the engine two calls).
    """
    counting = endpoint in ("chat.completions", "completions")
    base_url = await counting_url(variant) if counting else None
    if base_url is None:
        return heuristic_prompt_tokens(payload, endpoint, history), HEURISTIC
    tokenizer = Tokenizer(variant.engine, base_url, model)
    try:
        if endpoint == "chat.completions":
            messages = messages_with_history(payload["messages"], history)
            return await tokenizer.chat_tokens({**payload, "messages": messages}), TOKENIZE
        return await completion_tokens(tokenizer, payload.get("prompt")), TOKENIZE
    except TOKENIZER_ERRORS as exc:
        logger.warning("sizing on %s failed (%r); using the heuristic", variant.engine.name, exc)
    return heuristic_prompt_tokens(payload, endpoint, history), HEURISTIC


async def completion_tokens(tokenizer: Tokenizer, prompt: Any) -> int:
    """The largest prompt of a (batch) completion request, counted by the engine."""
    counts = await asyncio.gather(*(_count_pieces(tokenizer, p) for p in split_prompts(prompt)))
    return max(counts, default=0)


async def _count_pieces(tokenizer: Tokenizer, pieces: list[PromptPiece]) -> int:
    """Token ids count one each; text is tokenized (plus BOS: only text prompts get one)."""
    texts = [p for p in pieces if isinstance(p, str)]
    ids = len(pieces) - len(texts)
    if not texts:
        return ids
    counts = await asyncio.gather(*(tokenizer.text_tokens(t) for t in texts))
    return ids + sum(counts) + BOS_TOKENS


def prompt_token_bound(
    payload: dict[str, Any], endpoint: str, history: SessionHistory = NO_HISTORY
) -> int | None:
    """At least as many tokens as the prompt has, known without asking the engine; None
    for what it cannot bound (images or audio, tools, which some templates wrap in long
    instructions, rerank documents).

    No tokenizer makes more tokens than the text has UTF-8 bytes (byte-level BPE and
    SentencePiece with byte fallback spend at least a byte a token); a chat template adds
    at most TEMPLATE_TOKENS_PER_MESSAGE a message plus TEMPLATE_TOKENS overall (BOS, the
    assistant's opening, a default system header). A session's `history` is bounded
    without parsing it by its JSON's bytes: they hold every text the count above takes of
    a message (content, tool calls, name, reasoning), escaping only ever lengthens them.
    """
    if endpoint in ("completions", "embeddings"):
        key = "prompt" if endpoint == "completions" else "input"
        sizes = [sum(_piece_bound(p) for p in prompt) + BOS_TOKENS
                 for prompt in split_prompts(payload.get(key))]  # fmt: skip
        # A batch of completions runs in parallel slots (the largest must fit); every
        # input of an embeddings batch is paid for.
        return max(sizes, default=0) if endpoint == "completions" else sum(sizes)
    if endpoint != "chat.completions" or payload.get("tools") or history.media:
        return None
    total = TEMPLATE_TOKENS + len(history.json) + TEMPLATE_TOKENS_PER_MESSAGE * history.messages
    for message in payload.get("messages") or ():
        text = _message_bytes(message)
        if text is None:
            return None
        total += text + TEMPLATE_TOKENS_PER_MESSAGE
    return total


def _piece_bound(piece: PromptPiece) -> int:
    return len(piece.encode()) if isinstance(piece, str) else 1


def _message_bytes(message: Any) -> int | None:
    """UTF-8 bytes of what a chat message contributes, None if it has non-text parts."""
    if not isinstance(message, dict):
        return None
    content = message.get("content")
    if isinstance(content, list):
        if any(not isinstance(p, dict) or p.get("type") != "text" for p in content):
            return None
        content = "".join(str(p.get("text", "")) for p in content)
    size = len(content.encode()) if isinstance(content, str) else 0
    for key in ("tool_calls", "name", "reasoning_content"):
        if message.get(key):
            size += len(orjson.dumps(message[key]))
    return size


def heuristic_prompt_tokens(
    payload: dict[str, Any], endpoint: str, history: SessionHistory = NO_HISTORY
) -> int:
    """The estimate when the engine cannot count: ~4 characters a token (tokens.py); a
    session's history as its stored counts say."""
    if endpoint == "chat.completions":
        messages = [m for m in payload.get("messages") or () if isinstance(m, dict)]
        total = sum(heuristic_message_tokens(m) for m in messages) + ASSISTANT_PRIMING_TOKENS
        total += history.tokens
        if payload.get("tools"):
            total += heuristic_tokens(orjson.dumps(payload["tools"]).decode())
        return total
    if endpoint == "completions":
        prompts = split_prompts(payload.get("prompt"))
        return max((_heuristic_prompt(p) for p in prompts), default=0)
    value = payload.get("input")
    return sum(_heuristic_prompt(p) for p in split_prompts(value))


def _heuristic_prompt(pieces: list[PromptPiece]) -> int:
    return sum(heuristic_tokens(p) if isinstance(p, str) else 1 for p in pieces)


def split_prompts(prompt: Any) -> list[list[PromptPiece]]:
    """The separate prompts of a completions `prompt`, each as text and token pieces.

    Follows llama-server: a string is one prompt; an array of strings is a batch; an array
    of token ids (possibly mixed with strings) is one prompt; an array of arrays is a batch.
    """
    if isinstance(prompt, str):
        return [[prompt]]
    if not isinstance(prompt, list) or not prompt:
        return []
    if all(isinstance(p, str) for p in prompt):
        return [[p] for p in prompt]
    if any(isinstance(p, list) for p in prompt):
        return [_pieces(p) for p in prompt]
    return [_pieces(prompt)]


def _pieces(value: Any) -> list[PromptPiece]:
    items = value if isinstance(value, list) else [value]
    return [p for p in items if isinstance(p, str | int) and not isinstance(p, bool)]
