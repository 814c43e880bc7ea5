"""POST /v1/rerank: score documents against a query (llama.cpp's Jina/Cohere-style API).

Request:  {"model", "query", "documents": [str | {"text": str}], "top_n"?, "return_documents"?}
Response: {"object": "list", "model", "results": [{"index", "relevance_score",
          "document"?: {"text"}}], "usage": {"prompt_tokens", "total_tokens"}}
          results best first, at most top_n of them.

llama-server answers /v1/rerank (and /rerank) in that shape, but older builds neither sort
nor cut to top_n, its TEI flavour answers a bare list with `score`, and it only takes
documents as strings; the gateway evens this out so every engine looks the same.
"""

from __future__ import annotations

from typing import Any

from apps.core.context import RequestContext
from apps.core.errors import invalid_request
from apps.engines.stage import adapt_for_engine, resolve_model
from apps.engines.tokens import heuristic_tokens
from apps.proxy.consumers import ProxyConsumer
from apps.proxy.pipeline import Pipeline, validated
from apps.quotas.stage import quota_reserve
from apps.tenants.stage import admit, authenticate

UPSTREAM_PATH = "/v1/rerank"


class MalformedRerankResponse(ValueError):
    """The engine's answer is not a rerank result (the gateway should answer 502)."""


# --- request ---------------------------------------------------------------------------


def validate_rerank(payload: dict[str, Any]) -> None:
    model = payload.get("model")
    if model is None:
        raise invalid_request("You must provide a model parameter.", param="model")
    if not isinstance(model, str) or not model.strip():
        raise invalid_request("`model` must be a non-empty string.", param="model")
    query = payload.get("query")
    if not isinstance(query, str) or not query.strip():
        raise invalid_request("`query` must be a non-empty string.", param="query")
    _check_documents(payload.get("documents"))
    top_n = payload.get("top_n")
    if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1):
        raise invalid_request("`top_n` must be a positive integer.", param="top_n")
    if payload.get("return_documents") is not None and not isinstance(
        payload["return_documents"], bool
    ):
        raise invalid_request("`return_documents` must be a boolean.", param="return_documents")


def _check_documents(documents: Any) -> None:
    if not isinstance(documents, list) or not documents:
        raise invalid_request("`documents` must be a non-empty array.", param="documents")
    for index, document in enumerate(documents):
        if document_text(document) is None:
            param = f"documents.[{index}]"
            raise invalid_request(
                f"`{param}` must be a string or an object with a string `text`.", param=param
            )


def document_text(document: Any) -> str | None:
    """The text of a document given as a string or as {"text": ...}; None if neither."""
    if isinstance(document, str):
        return document
    if isinstance(document, dict) and isinstance(document.get("text"), str):
        return document["text"]
    return None


def engine_payload(payload: dict[str, Any]) -> bool:
    """Rewrite `documents` as plain strings, the only form llama-server takes; True if changed.

    The client's documents are what normalize_rerank_response needs, so keep a copy first.
    """
    documents = payload["documents"]
    if all(isinstance(document, str) for document in documents):
        return False
    payload["documents"] = [document_text(document) for document in documents]
    return True


# --- response --------------------------------------------------------------------------


def normalize_rerank_response(
    raw: Any,
    top_n: int | None,
    documents: list[Any],
    return_documents: bool,
    *,
    model: str | None = None,
    query: str = "",
) -> dict[str, Any]:
    """The engine's answer in the gateway's shape: sorted best first, cut to top_n.

    `documents` are the client's (strings or {"text"}), to attach when return_documents.
    `model` overrides the engine's model name; `query` feeds the usage estimate when the
    engine reports no usage.
    """
    results = [_result(item, len(documents)) for item in _raw_results(raw)]
    # Highest score first; equal scores keep document order, so answers are deterministic.
    results.sort(key=lambda r: (-r["relevance_score"], r["index"]))
    if top_n is not None:
        results = results[:top_n]
    if return_documents:
        for result in results:
            result["document"] = {"text": document_text(documents[result["index"]]) or ""}
    engine_model = raw.get("model") if isinstance(raw, dict) else None
    return {
        "object": "list",
        "model": model or engine_model or "",
        "results": results,
        "usage": _usage(raw, documents, query),
    }


def _raw_results(raw: Any) -> list[Any]:
    """llama.cpp's Jina shape {"results": [...]}, or its TEI shape: a bare list."""
    if isinstance(raw, list):
        return raw
    if isinstance(raw, dict) and isinstance(raw.get("results"), list):
        return raw["results"]
    raise MalformedRerankResponse("the engine's answer has no `results` array")


def _result(item: Any, document_count: int) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise MalformedRerankResponse("a rerank result is not an object")
    index = item.get("index")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < document_count:
        raise MalformedRerankResponse(f"a rerank result has a bad index: {index!r}")
    score = item.get("relevance_score", item.get("score"))  # TEI calls it `score`
    if isinstance(score, bool) or not isinstance(score, int | float):
        raise MalformedRerankResponse(f"a rerank result has a bad score: {score!r}")
    return {"index": index, "relevance_score": float(score)}


def _usage(raw: Any, documents: list[Any], query: str) -> dict[str, int]:
    usage = raw.get("usage") if isinstance(raw, dict) else None
    if isinstance(usage, dict):
        prompt = usage.get("prompt_tokens", usage.get("total_tokens"))
        total = usage.get("total_tokens", prompt)
        if isinstance(prompt, int) and isinstance(total, int):
            return {"prompt_tokens": prompt, "total_tokens": total}
    estimate = rerank_prompt_estimate(query, documents)
    return {"prompt_tokens": estimate, "total_tokens": estimate}


def rerank_prompt_estimate(query: str, documents: list[Any]) -> int:
    """Heuristic prompt tokens of a rerank: each document is scored together with the query
    (for ctx.prompt_estimate / quota reservations, which cannot see `query` + `documents`)."""
    texts = [document_text(document) or "" for document in documents]
    return sum(heuristic_tokens(query) + heuristic_tokens(text) for text in texts)


# --- pipeline ----------------------------------------------------------------------------


class RerankNormalizer:
    """Response filter: the engine's rerank answer in the gateway's shape (whole only)."""

    def __init__(self, payload: dict[str, Any]) -> None:
        self.client_documents = list(payload["documents"])
        self.top_n: int | None = payload.get("top_n")
        self.return_documents = payload.get("return_documents") is True
        self.query: str = payload["query"]
        self.client_model: str = payload["model"]

    def whole(self, ctx: RequestContext, body: Any) -> dict[str, Any]:
        return normalize_rerank_response(
            body,
            self.top_n,
            self.client_documents,
            self.return_documents,
            model=ctx.model or self.client_model,
            query=self.query,
        )

    def stream(self, ctx: RequestContext) -> None:
        return None  # rerank answers are never streamed


async def rerank_prepare(ctx: RequestContext) -> None:
    """Documents as plain strings for the engine; the answer normalised on the way back
    (the filter keeps the client's documents); the prompt estimated from query + documents."""
    ctx.response_filters.append(RerankNormalizer(ctx.payload))
    ctx.prompt_estimate = rerank_prompt_estimate(ctx.payload["query"], ctx.payload["documents"])
    if engine_payload(ctx.payload):
        ctx.payload_changed = True


RERANK = Pipeline(
    endpoint="rerank",
    upstream_path=UPSTREAM_PATH,
    stages=(
        authenticate,
        admit,
        validated(validate_rerank),
        resolve_model,
        rerank_prepare,
        adapt_for_engine,
        quota_reserve,
    ),
)


class RerankConsumer(ProxyConsumer):
    pipeline = RERANK
