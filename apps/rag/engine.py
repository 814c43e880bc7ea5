"""Embeddings, reranking and token counting for RAG, through the platform's own engine
registry: the model's engine (any flavour, external or managed), a scheduler slot on one of
its replicas (so ingestion and retrieval share the engine's slots fairly with chat
traffic), and the worker's shared aiohttp client."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import orjson
from django.conf import settings

from apps.core.errors import ApiError
from apps.engines.client import engine_session, engine_url, request_timeout
from apps.engines.registry import VariantRoute, registry
from apps.engines.scheduler import SchedulerBusy, SlotRequest
from apps.engines.scheduler_service import worker_scheduler
from apps.engines.stage import largest_variant, replica_order, replica_url
from apps.engines.tokens import TOKENIZER_ERRORS, Tokenizer, counting_url

logger = logging.getLogger(__name__)
TRANSIENT_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


class EngineError(Exception):
    """An engine call failed; `transient` ones (overload, restarts, timeouts) may be retried."""

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


async def variant_of(model: str) -> tuple[str, VariantRoute]:
    """The model's own name (`model` may be an alias) and its largest variant."""
    route = (await registry.get()).find(model)
    if route is None or not route.variants:
        raise EngineError(f"The model `{model}` is not served by any engine.", transient=False)
    return route.name, largest_variant(route)


async def engine_post(
    *,
    model: str,
    path: str,
    body: dict[str, Any],
    tenant: str,
    weight: int = 1,
    client: aiohttp.ClientSession | None = None,
) -> dict[str, Any]:
    """POST `body` (with the model's own name) to `path` of the model's engine, in a slot."""
    name, variant = await variant_of(model)
    engine = variant.engine
    request = SlotRequest(
        engine.name,
        replicas=engine.replicas,
        slots=engine.slots,
        tenant=tenant,
        weight=weight,
        insist=False,
        max_queue=settings.SCHEDULER_MAX_QUEUE,
        max_wait=settings.SCHEDULER_MAX_WAIT_SECONDS,
        replica_order=await replica_order(variant),
    )
    lease = worker_scheduler().slot(request)
    headers = {"Content-Type": "application/json"}
    if engine.upstream_api_key:
        headers["Authorization"] = f"Bearer {engine.upstream_api_key}"
    try:
        async with (
            lease as placement,
            replica_url(variant, placement.replica) as base_url,
            (client or engine_session()).post(
                engine_url(base_url, path),
                data=orjson.dumps({**body, "model": name}),
                headers=headers,
                timeout=request_timeout(engine.timeout_seconds),
            ) as resp,
        ):
            raw = await resp.read()
            status = resp.status
    except SchedulerBusy as busy:
        raise EngineError(
            f"Engine `{engine.name}` is busy ({busy.reason}).", transient=True
        ) from None
    except ApiError as exc:  # a managed engine that cannot start
        raise EngineError(exc.message, transient=True) from None
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise EngineError(
            f"Engine `{engine.name}` is unreachable: {exc!r}", transient=True
        ) from None
    if status != 200:
        detail = raw[:300].decode("utf-8", "replace")
        raise EngineError(
            f"Engine `{engine.name}` answered {status} on {path}: {detail}",
            transient=status in TRANSIENT_STATUSES,
        )
    try:
        answer = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise EngineError(
            f"Engine `{engine.name}` sent no JSON on {path}.", transient=False
        ) from None
    if not isinstance(answer, dict):
        raise EngineError(f"Engine `{engine.name}` sent no JSON object on {path}.", transient=False)
    return answer


async def embed(
    *,
    model: str,
    texts: list[str],
    tenant: str,
    weight: int = 1,
    client: aiohttp.ClientSession | None = None,
) -> list[list[float]]:
    """One embedding per text, in order."""
    answer = await engine_post(
        model=model,
        path="/v1/embeddings",
        body={"input": texts},
        tenant=tenant,
        weight=weight,
        client=client,
    )
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


async def embed_with_retries(*, model: str, texts: list[str], tenant: str) -> list[list[float]]:
    """embed(), retrying transient engine errors with backoff (RAG_EMBED_RETRIES times)."""
    delay = settings.RAG_EMBED_RETRY_SECONDS
    for attempt in range(settings.RAG_EMBED_RETRIES + 1):
        try:
            return await embed(model=model, texts=texts, tenant=tenant)
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
    tenant: str,
    weight: int = 1,
    client: aiohttp.ClientSession | None = None,
) -> list[float]:
    """A relevance score per document, in the documents' order."""
    answer = await engine_post(
        model=model,
        path="/v1/rerank",
        body={"query": query, "documents": documents},
        tenant=tenant,
        weight=weight,
        client=client,
    )
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
