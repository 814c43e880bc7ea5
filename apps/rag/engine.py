"""Embeddings, reranking and token counting for RAG, through the platform's own engine
registry: the model's engine (any flavour, external or managed), a scheduler slot on one of
its replicas (so ingestion and retrieval share the engine's slots fairly with chat
traffic), and the worker's shared aiohttp client (apps/engines/calls.py). Every call is
metered (apps/core/usage.py): charged to the payer's token quota with the tokens the
engine reports, and recorded in the request log and metrics under its kind."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
from django.conf import settings

from apps.core.usage import EMBEDDINGS_RETRIEVAL, RERANK_RETRIEVAL, Payer, UsageCall, metered
from apps.engines.calls import EngineError, engine_post, variant_of
from apps.engines.tokens import TOKENIZER_ERRORS, Tokenizer, counting_url, heuristic_tokens

__all__ = ["EngineError", "chars_per_token", "embed", "embed_with_retries", "rerank"]
logger = logging.getLogger(__name__)


async def embed(
    *,
    model: str,
    texts: list[str],
    payer: Payer,
    kind: str = EMBEDDINGS_RETRIEVAL,
    wait: bool = False,
    client: aiohttp.ClientSession | None = None,
) -> list[list[float]]:
    """One embedding per text, in order. The payer's quota must have room for the texts
    (UsageRefused otherwise); it is charged the tokens the engine reports."""
    call = UsageCall(
        payer=payer, kind=kind, model=model, estimate=sum(heuristic_tokens(t) for t in texts)
    )
    async with metered(call, admitted=False, wait=wait):
        answer = await engine_post(
            model=model,
            path="/v1/embeddings",
            body={"input": texts},
            tenant=payer.tenant_slug,
            weight=payer.weight,
            client=client,
            call=call,
        )
        call.took(answer.get("usage"))
    try:
        data = sorted(answer["data"], key=lambda item: item["index"])
        vectors = [[float(x) for x in item["embedding"]] for item in data]
    except (KeyError, TypeError, ValueError):
        raise EngineError("The engine's embeddings answer is malformed.", transient=False) from None
    if len(vectors) != len(texts) or not vectors or len({len(v) for v in vectors}) != 1:
        raise EngineError(
            "The engine returned embeddings of the wrong count or shape.", transient=False
        )
    return vectors


async def embed_with_retries(
    *, model: str, texts: list[str], payer: Payer, kind: str
) -> list[list[float]]:
    """embed(), retrying transient engine errors with backoff (RAG_EMBED_RETRIES times);
    each call is charged once it is over (the next one sees its tokens)."""
    delay = settings.RAG_EMBED_RETRY_SECONDS
    for attempt in range(settings.RAG_EMBED_RETRIES + 1):
        try:
            return await embed(model=model, texts=texts, payer=payer, kind=kind, wait=True)
        except EngineError as exc:
            if not exc.transient or attempt == settings.RAG_EMBED_RETRIES:
                raise
            logger.warning("embedding failed (%s); retrying in %.1f s", exc, delay)
            await asyncio.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


async def rerank(
    *,
    model: str,
    query: str,
    documents: list[str],
    payer: Payer,
    client: aiohttp.ClientSession | None = None,
) -> list[float]:
    """A relevance score per document, in the documents' order (metered as embed())."""
    estimate = heuristic_tokens(query) * len(documents) + sum(map(heuristic_tokens, documents))
    call = UsageCall(payer=payer, kind=RERANK_RETRIEVAL, model=model, estimate=estimate)
    async with metered(call, admitted=False):
        answer = await engine_post(
            model=model,
            path="/v1/rerank",
            body={"query": query, "documents": documents},
            tenant=payer.tenant_slug,
            weight=payer.weight,
            client=client,
            call=call,
        )
        call.took(answer.get("usage"))
    scores = [0.0] * len(documents)
    try:
        for item in answer["results"]:
            scores[int(item["index"])] = float(item.get("relevance_score", item.get("score")))
    except (KeyError, TypeError, ValueError, IndexError):
        raise EngineError("The engine's rerank answer is malformed.", transient=False) from None
    return scores


async def chars_per_token(*, model: str, sample: str) -> float | None:
    """Characters per token of `sample` by the model's own tokenizer; None if the engine
    has no /tokenize (or a managed one is not running: it is not started just to count)."""
    if not sample.strip():
        return None
    try:
        name, variant = await variant_of(model)
        base_url = await counting_url(variant)
        if base_url is None:
            return None
        tokens = await Tokenizer(variant.engine, base_url, name).text_tokens(sample)
    except (EngineError, *TOKENIZER_ERRORS) as exc:
        logger.info("no tokenizer for %s (%r); chunking by the heuristic", model, exc)
        return None
    return len(sample) / tokens if tokens else None
