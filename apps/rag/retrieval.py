"""Hybrid retrieval over one or more corpora of a tenant.

1. The query is embedded with each corpus's embedding model.
2. Vector candidates come from the vector store (cosine), full-text candidates from
   PostgreSQL (`ts_rank_cd` over the chunks' tsvector, any of the query's words).
3. The two rankings are fused by weighted reciprocal rank fusion: a chunk scores
   w / (RRF_K + vector rank) + (1 - w) / (RRF_K + text rank), w the corpus's hybrid
   weight.
4. With a rerank model (the first corpus's that has one), the best fused candidates are
   reranked through the engine's /v1/rerank and its relevance score is the chunk's
   score; without, the score is the chunk's cosine similarity to the query.
5. Chunks scoring below the corpus's threshold (if not 0) are dropped; top_k are kept.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime

import aiohttp
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async as sync_to_async
from django.conf import settings
from django.db import connection
from django.db.models import OuterRef, QuerySet, Subquery, Sum

from apps.core.usage import Payer, usage_drain
from apps.rag import engine
from apps.rag.models import Corpus, Document
from apps.rag.stores import _vector_literal, vector_store
from apps.rag.usage import searches_record

RRF_K = 60
RERANK_POOL_FACTOR = 4  # candidates reranked per result kept


@dataclass(frozen=True, slots=True)
class Hit:
    chunk_id: int
    corpus_id: str  # public id
    document: str
    document_id: str  # the file's public id
    page: int | None
    text: str
    score: float
    position: int

    def as_source(self, number: int) -> dict:
        return {
            "id": number,
            "document": self.document,
            "document_id": self.document_id,
            "corpus_id": self.corpus_id,
            "page": self.page,
            "score": round(self.score, 4),
            "text": self.text,
        }


@dataclass(frozen=True, slots=True)
class CorpusRef:
    """What retrieval needs of a corpus (safe to pass between threads)."""

    pk: int
    public_id: str
    embedding_model: str
    dims: int | None
    top_k: int
    rerank_model: str
    hybrid_weight: float
    score_threshold: float
    chunks: int = 0  # in its ready documents
    last_active_at: datetime | None = None  # as loaded: whether a use needs recording

    @classmethod
    def of(cls, corpus: Corpus, *, chunks: int = 0) -> CorpusRef:
        return cls(
            corpus.pk,
            corpus.public_id,
            corpus.embedding_model,
            corpus.embedding_dims,
            corpus.top_k,
            corpus.rerank_model,
            corpus.hybrid_weight,
            corpus.score_threshold,
            chunks,
            corpus.last_active_at,
        )


def with_ready_chunks(corpora: QuerySet[Corpus]) -> QuerySet[Corpus]:
    """The corpora, each with `ready_chunks`: the chunks of its ready documents, in the
    same query (one round trip for the RAG stage)."""
    ready = (
        Document.objects.filter(corpus=OuterRef("pk"), status=Document.Status.READY)
        .values("corpus")
        .annotate(n=Sum("chunk_count"))
        .values("n")
    )
    return corpora.annotate(ready_chunks=Subquery(ready))


def corpus_refs(corpora: list[Corpus]) -> list[CorpusRef]:
    """The corpora with their chunk counts (summed over their ready documents: one small
    aggregate, never a count of the chunks themselves; in the same query when they come
    from with_ready_chunks)."""
    if all(hasattr(c, "ready_chunks") for c in corpora):
        return [CorpusRef.of(c, chunks=c.ready_chunks or 0) for c in corpora]
    counts = dict(
        Document.objects.filter(corpus__in=corpora, status=Document.Status.READY)
        .values("corpus_id")
        .annotate(n=Sum("chunk_count"))
        .values_list("corpus_id", "n")
    )
    return [CorpusRef.of(c, chunks=counts.get(c.pk) or 0) for c in corpora]


async def retrieve(
    *,
    corpora: list[CorpusRef],
    query: str,
    top_k: int | None,
    payer: Payer,
    store: str | None = None,
    client: aiohttp.ClientSession | None = None,
) -> list[Hit]:
    """The best chunks for `query` across `corpora` (all of one tenant: the caller checked).
    The query's embeddings and reranking are charged to `payer` (UsageRefused if its
    quota has no room)."""
    searchable = [c for c in corpora if c.dims]
    if not searchable or not query.strip():
        return []
    k = top_k or max(c.top_k for c in searchable)
    vectors = {}
    for model in {c.embedding_model for c in searchable}:
        vectors[model] = (
            await engine.embed(model=model, texts=[query], payer=payer, client=client)
        )[0]
    rerank_model = next((c.rerank_model for c in searchable if c.rerank_model), "")
    pool = k * RERANK_POOL_FACTOR if rerank_model else k
    hits = await sync_to_async(candidates, thread_sensitive=False)(
        corpora=searchable, query=query, vectors=vectors, limit=pool, store=store
    )
    if rerank_model and hits:
        scores = await engine.rerank(
            model=rerank_model,
            query=query,
            documents=[h.text for h in hits],
            payer=payer,
            client=client,
        )
        hits = sorted(
            (_rescored(h, s) for h, s in zip(hits, scores, strict=True)), key=lambda h: -h.score
        )
    thresholds = {c.public_id: c.score_threshold for c in searchable}
    return [h for h in hits if not thresholds[h.corpus_id] or h.score >= thresholds[h.corpus_id]][
        :k
    ]


def _rescored(hit: Hit, score: float) -> Hit:
    return Hit(
        hit.chunk_id,
        hit.corpus_id,
        hit.document,
        hit.document_id,
        hit.page,
        hit.text,
        score,
        hit.position,
    )


def candidates(
    *,
    corpora: list[CorpusRef],
    query: str,
    vectors: dict[str, list[float]],
    limit: int,
    store: str | None = None,
) -> list[Hit]:
    """Fused vector + full-text candidates, best first (at most `limit`)."""
    fused: dict[int, float] = defaultdict(float)
    weights = {c.pk: c.hybrid_weight for c in corpora}
    pool = max(limit, settings.RAG_CANDIDATES)
    by_space: dict[tuple[str, int], list[int]] = defaultdict(list)
    for c in corpora:
        by_space[(c.embedding_model, c.dims)].append(c.pk)
    chunks = {c.pk: c.chunks for c in corpora}
    for (model, dims), ids in by_space.items():
        # Small corpora are searched exactly: a filtered HNSW walk over a large index
        # visits many other corpora's vectors before it finds this one's.
        exact = sum(chunks[i] for i in ids) <= settings.RAG_EXACT_SEARCH_MAX_CHUNKS
        nearest = vector_store(store).nearest(
            corpus_ids=ids, dims=dims, query=vectors[model], limit=pool, exact=exact
        )
        for rank, (chunk_id, corpus_id, _) in enumerate(nearest, 1):
            fused[chunk_id] += weights[corpus_id] / (RRF_K + rank)
    for rank, (chunk_id, corpus_id) in enumerate(
        _text_matches([c.pk for c in corpora], query, pool, chunks=sum(chunks.values())), 1
    ):
        fused[chunk_id] += (1 - weights[corpus_id]) / (RRF_K + rank)
    best = sorted(fused, key=lambda i: -fused[i])[:limit]
    return _hits(best, corpora=corpora, vectors=vectors)


WORD = re.compile(r"\w+", re.UNICODE)
_LEXEMES_MAX = 50_000  # words whose lexemes a process remembers


@dataclass(slots=True)
class _TermStats:
    """Each query word's lexemes (English stemming; none for a stop word), and each
    frequent lexeme's share of all chunks: the planner's statistics of the column
    (most_common_elems, kept by (auto)ANALYZE; a lexeme not among them is rarer than all
    that are: 0)."""

    lexemes: dict[str, tuple[str, ...]]
    shares: dict[str, float]
    read_at: float = float("-inf")


_terms = _TermStats({}, {})


def _query_terms(cursor, words: list[str]) -> dict[str, float]:
    """The words' distinct lexemes with their shares of the chunks."""
    now = time.monotonic()
    if now - _terms.read_at > settings.RAG_TERM_STATS_SECONDS:
        cursor.execute(
            "SELECT most_common_elems::text::text[], most_common_elem_freqs FROM pg_stats "
            "WHERE schemaname = current_schema() AND tablename = 'rag_chunk' "
            "AND attname = 'search_vector'"
        )
        row = cursor.fetchone()
        _terms.shares = dict(zip(row[0], row[1], strict=False)) if row and row[0] else {}
        _terms.read_at = now
    new = [w for w in dict.fromkeys(words) if w not in _terms.lexemes]
    if new:
        if len(_terms.lexemes) > _LEXEMES_MAX:
            _terms.lexemes = {}
        cursor.execute(
            "SELECT w, tsvector_to_array(to_tsvector('english', w)) FROM unnest(%s::text[]) w",
            [new],
        )
        _terms.lexemes.update((w, tuple(lexemes)) for w, lexemes in cursor.fetchall())
    return {
        lexeme: _terms.shares.get(lexeme, 0.0)
        for w in words
        for lexeme in _terms.lexemes.get(w, ())
    }


def _tsquery(lexemes: list[str]) -> str:
    return " | ".join("'" + x.replace("\\", "\\\\").replace("'", "''") + "'" for x in lexemes)


def _text_matches(
    corpus_ids: list[int], query: str, limit: int, *, chunks: int = 0
) -> list[tuple[int, int]]:
    """Chunks matching the query's rarest words, ranked by all its words, best first
    (`chunks`: how many the corpora hold, to estimate the words' matches; 0: unknown).

    The rarest words are kept while their estimated matches in the corpora stay within
    RAG_TEXT_MATCH_CAP (the rarest always): only their matches are read and ranked (by
    ts_rank over all the words). A rare word tells more about a chunk than a common one,
    and the common ones' matches (a large share of a big corpus) were the cost: PostgreSQL
    builds the whole bitmap of a query's matches, and ranking is per row. ts_rank (term
    frequency) rather than ts_rank_cd (cover density): 5x cheaper per row, as good on
    chunks this short (bench/rag_bench.py measures both against the uncapped ts_rank_cd
    ranking)."""
    words = WORD.findall(query.lower())[:64]
    if not words:
        return []
    cap = settings.RAG_TEXT_MATCH_CAP
    with connection.cursor() as cursor:
        shares = _query_terms(cursor, words)
        if not shares:
            return []  # stop words only
        budget = cap / chunks if chunks else float("inf")
        rarest, total = [], 0.0
        for lexeme in sorted(shares, key=lambda x: (shares[x], x)):
            total += shares[lexeme]
            if rarest and total > budget:
                break
            rarest.append(lexeme)
        cursor.execute(
            "SELECT c.id, c.corpus_id FROM ("
            "  SELECT id, corpus_id, search_vector FROM rag_chunk"
            "  WHERE corpus_id = ANY(%s) AND search_vector @@ %s::tsquery LIMIT %s) c "
            "ORDER BY ts_rank(c.search_vector, %s::tsquery) DESC, c.id LIMIT %s",
            [corpus_ids, _tsquery(rarest), cap, _tsquery(list(shares)), limit],
        )
        return cursor.fetchall()


def _hits(
    chunk_ids: list[int], *, corpora: list[CorpusRef], vectors: dict[str, list[float]]
) -> list[Hit]:
    """The chunks with their documents, scored by cosine similarity to the query, in the
    order given."""
    if not chunk_ids:
        return []
    by_pk = {c.pk: c for c in corpora}
    rows: dict[int, tuple] = {}
    for corpus in corpora:
        n = int(corpus.dims)
        with connection.cursor() as cursor:
            cursor.execute(
                f"SELECT c.id, c.text, c.page, c.position, d.name, f.public_id, "
                f"1 - (c.embedding::vector({n}) <=> %s::vector({n})) "
                f"FROM rag_chunk c JOIN rag_document d ON d.id = c.document_id "
                f"JOIN rag_storedfile f ON f.id = d.file_id "
                f"WHERE c.id = ANY(%s) AND c.corpus_id = %s AND c.dims = {n}",
                [_vector_literal(vectors[corpus.embedding_model]), chunk_ids, corpus.pk],
            )
            for row in cursor.fetchall():
                rows[row[0]] = (corpus.pk, *row[1:])
    hits = []
    for chunk_id in chunk_ids:
        if chunk_id in rows:
            corpus_pk, text, page, position, name, file_id, similarity = rows[chunk_id]
            hits.append(
                Hit(
                    chunk_id,
                    by_pk[corpus_pk].public_id,
                    name,
                    file_id,
                    page,
                    text,
                    float(similarity),
                    position,
                )
            )
    return hits


def search_now(*, corpora: list[Corpus], query: str, top_k: int | None, payer: Payer) -> list[Hit]:
    """retrieve() from synchronous code (the tenant API, the page), with a client of its
    own: the worker's shared one belongs to its event loop. Its charges and log rows are
    written before it returns (the loop it runs in may end with it)."""

    refs = corpus_refs(corpora)

    async def run() -> list[Hit]:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as client:
            try:
                return await retrieve(
                    corpora=refs, query=query, top_k=top_k, payer=payer, client=client
                )
            finally:
                await usage_drain()

    hits = async_to_sync(run)()
    searches_record(corpus_ids=[c.pk for c in corpora])
    return hits
