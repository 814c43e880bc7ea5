"""Automatic RAG on chat completions: two stages around the session's history.

`rag_retrieve` (before the session stage): which corpora apply — the request's own
`"rag": {"corpora": [...], "top_k": n}` (or `"rag": false`), else its session's setting
(`PUT /api/sessions/{id}/rag`), else the key's automatic RAG, else the tenant's — then hybrid retrieval for the newest user message as the client sent
it (not rewritten with the history), and room kept for the sources in the history
trimming. `rag_inject` (after it): the sources, numbered, in the system message with an
instruction to cite them, so sizing, the variant choice and the quota count them; the
sources go back to the client as a top-level `"sources"` field, or in a stream as one
extra chunk before `[DONE]`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from channels.db import database_sync_to_async
from django.utils import timezone

from apps.core.context import RequestContext
from apps.core.errors import ApiError, invalid_request
from apps.core.usage import Payer, UsageRefused
from apps.engines.tokens import heuristic_tokens, message_text
from apps.rag import selectors
from apps.rag.engine import EngineError
from apps.rag.models import Corpus
from apps.rag.retrieval import CorpusRef, Hit, corpus_refs, retrieve, with_ready_chunks
from apps.rag.services import corpora_touch, expired_error, is_idle
from apps.rag.usage import search_counter

CITE_INSTRUCTION = (
    "Answer using the numbered sources below when they are relevant, and cite each one you "
    "use by its number in square brackets, like [1]. If the sources do not contain the "
    "answer, say so."
)
SOURCE_OVERHEAD_TOKENS = 8  # the "[n] (name, page)" line of each source
MAX_TOP_K = 50


@dataclass
class RagTurn:
    hits: list[Hit] = field(default_factory=list)

    def sources(self) -> list[dict[str, Any]]:
        return [hit.as_source(n) for n, hit in enumerate(self.hits, 1)]


@dataclass(frozen=True, slots=True)
class RagRequest:
    corpus_ids: tuple[str, ...] | tuple[int, ...]
    by_public_id: bool
    top_k: int | None


async def requested(ctx: RequestContext) -> RagRequest | None:
    """The RAG this request asks for: its own `rag` field (taken out of the body), else
    its session's setting, else its key's or tenant's default; None: no RAG."""
    assert ctx.principal is not None
    if "rag" in ctx.payload:
        ctx.payload_changed = True
        return _parse(ctx.payload.pop("rag"))
    # Looked up only for tenants that have set RAG on some session (cached with the key).
    if ctx.session_id is not None and ctx.principal.attachments.get("rag_sessions"):
        setting = await _session_setting(ctx.principal.tenant_id, ctx.session_id)
        if setting is not None:
            return setting if setting.corpus_ids else None
    default = ctx.principal.attachments.get("rag")
    if default is None or not default.corpus_ids:
        return None
    return RagRequest(default.corpus_ids, by_public_id=False, top_k=default.top_k)


def _session_setting_now(tenant_id: int, session_id: str) -> RagRequest | None:
    """The session's RAG (no corpora: turned off for it), or None when it has none."""
    try:
        found = selectors.session_rag_get(tenant_id=tenant_id, session_id=session_id)
    except selectors.NotFound:
        return None
    corpus_ids = tuple(sorted(c.pk for c in found.corpora.all())) if found.enabled else ()
    return RagRequest(corpus_ids, by_public_id=False, top_k=found.top_k)


_session_setting = database_sync_to_async(_session_setting_now, thread_sensitive=False)


def _parse(value: Any) -> RagRequest | None:
    if value is False or value is None:
        return None
    if not isinstance(value, dict):
        raise invalid_request("`rag` must be an object or false.", param="rag")
    corpora = value.get("corpora")
    if not isinstance(corpora, list) or not corpora or not all(isinstance(c, str) for c in corpora):
        raise invalid_request(
            "`rag.corpora` must be a non-empty array of corpus ids.", param="rag.corpora"
        )
    top_k = value.get("top_k")
    if top_k is not None and (
        isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= MAX_TOP_K
    ):
        raise invalid_request(
            f"`rag.top_k` must be an integer between 1 and {MAX_TOP_K}.", param="rag.top_k"
        )
    return RagRequest(tuple(dict.fromkeys(corpora)), by_public_id=True, top_k=top_k)


def _corpora_now(tenant_id: int, wanted: RagRequest) -> list[CorpusRef]:
    """The tenant's corpora among the wanted ones; another tenant's id is a 404."""
    key = "public_id__in" if wanted.by_public_id else "pk__in"
    found = {
        (c.public_id if wanted.by_public_id else c.pk): c
        for c in with_ready_chunks(
            # order_by(): the default ordering's join with the tenants is not needed here
            Corpus.objects.filter(tenant_id=tenant_id, **{key: list(wanted.corpus_ids)}).order_by()
        )
    }
    missing = [c for c in wanted.corpus_ids if c not in found]
    if missing and wanted.by_public_id:
        raise ApiError(
            404,
            f"No vector store found with id '{missing[0]}'.",
            code="not_found",
            param="rag.corpora",
        )
    now = timezone.now()
    expired = [c for c in found.values() if c.is_expired(now)]
    if expired and wanted.by_public_id:  # asked for by id: say so, as OpenAI does
        error = expired_error(expired[0])
        raise ApiError(error.status, error.message, code=error.code, param="rag.corpora")
    live = [found[c] for c in wanted.corpus_ids if c in found and found[c] not in expired]
    # A default's (key's, tenant's, session's) expired store is left out, not an error:
    # the chat still answers, without what that store held.
    return corpus_refs(live)


_corpora = database_sync_to_async(_corpora_now, thread_sensitive=False)


_touch = database_sync_to_async(corpora_touch, thread_sensitive=False)


def newest_user_text(messages: Any) -> str:
    if not isinstance(messages, list):
        return ""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return message_text(message)
    return ""


async def rag_retrieve(ctx: RequestContext) -> None:
    wanted = await requested(ctx)
    if wanted is None:
        return
    assert ctx.principal is not None
    corpora = await _corpora(ctx.principal.tenant_id, wanted)
    query = newest_user_text(ctx.payload.get("messages"))
    turn = RagTurn()
    ctx.extras["rag"] = turn
    if not corpora or not query.strip():
        return
    try:
        turn.hits = await retrieve(
            corpora=corpora,
            query=query,
            top_k=wanted.top_k,
            payer=Payer.of(ctx.principal),
        )
    except UsageRefused as refused:  # no room in the quota even for the query's embedding
        raise refused.error from None
    except EngineError as exc:
        raise ApiError(
            502, f"Retrieval failed: {exc}", type="api_error", code="rag_failed"
        ) from None
    search_counter.add(c.pk for c in corpora)  # in memory, written in batches
    # Most requests send no query here: each store's use is recorded once a minute at most.
    now = timezone.now()
    if any(is_idle(c.last_active_at, now) for c in corpora):
        await _touch(corpora=corpora)
    ctx.added_prompt_tokens += sum(
        heuristic_tokens(h.text) + SOURCE_OVERHEAD_TOKENS for h in turn.hits
    )
    ctx.response_filters.append(SourcesFilter(turn))


def sources_text(hits: list[Hit]) -> str:
    parts = [CITE_INSTRUCTION, ""]
    for number, hit in enumerate(hits, 1):
        where = f"{hit.document}, page {hit.page}" if hit.page is not None else hit.document
        parts.append(f"[{number}] ({where})\n{hit.text}\n")
    return "\n".join(parts)


async def rag_inject(ctx: RequestContext) -> None:
    """The sources in the system message (the first one, or a new one): new message dicts,
    so the session stores the client's messages as sent."""
    turn = ctx.extras.get("rag")
    if turn is None or not turn.hits:
        return
    messages = list(ctx.payload["messages"])
    context = sources_text(turn.hits)
    first = messages[0] if messages else None
    if (
        isinstance(first, dict)
        and first.get("role") == "system"
        and isinstance(first.get("content"), str)
    ):
        messages[0] = {**first, "content": f"{first['content']}\n\n{context}"}
    else:
        messages.insert(0, {"role": "system", "content": context})
    ctx.payload["messages"] = messages
    ctx.payload_changed = True


class SourcesFilter:
    """The sources, to the client: a top-level field of a whole answer, or one extra chunk
    (no choices, as the usage chunk) at the end of a stream."""

    def __init__(self, turn: RagTurn) -> None:
        self.turn = turn

    def whole(self, ctx: RequestContext, body: Any) -> Any:
        if isinstance(body, dict):
            body["sources"] = self.turn.sources()
        return body

    def stream(self, ctx: RequestContext) -> SourcesChunk:
        return SourcesChunk(self.turn, model=ctx.model)


class SourcesChunk:
    def __init__(self, turn: RagTurn, *, model: str) -> None:
        self.turn, self.model, self.id = turn, model, ""

    def feed(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        self.id = self.id or str(chunk.get("id") or "")
        return [chunk]

    def flush(self) -> list[dict[str, Any]]:
        return [
            {
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": self.model,
                "choices": [],
                "sources": self.turn.sources(),
            }
        ]
