"""Nearest chunks to a query vector, behind one small interface with two backends
(settings.RAG_VECTOR_STORE):

- `pgvector`: the partial HNSW index of the corpus's dimension (apps/rag/indexes.py),
  cosine distance, with pgvector's iterative scan so a filter on corpora still returns
  `limit` rows however small the corpus is among all chunks.
- `numpy`: the corpus's chunk vectors as one normalized matrix per process, refreshed
  when the corpus's chunks change; cosine is one matrix-vector product.

Both return (chunk id, corpus id, cosine similarity), most similar first.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol

import numpy as np
from django.conf import settings
from django.db import connection

from apps.rag.models import Chunk

Nearest = list[tuple[int, int, float]]
# HNSW candidates examined per query: recall@10 on random 384-dimension vectors (the worst
# case: no clusters) is ~0.5 at pgvector's default of 40, higher here (bench/rag_bench.py).
EF_SEARCH = 100


class VectorStore(Protocol):
    """`exact`: a hint that the corpora are small enough to compare with every vector."""

    def nearest(
        self,
        *,
        corpus_ids: list[int],
        dims: int,
        query: list[float],
        limit: int,
        exact: bool = False,
    ) -> Nearest: ...


def _vector_literal(values: list[float] | np.ndarray) -> str:
    return "[" + ",".join(f"{float(x):.7g}" for x in values) + "]"


class PgVectorStore:
    def nearest(
        self,
        *,
        corpus_ids: list[int],
        dims: int,
        query: list[float],
        limit: int,
        exact: bool = False,
    ) -> Nearest:
        n = int(dims)
        # Ordering by the uncast column is not the index's expression: an exact scan of the
        # corpus's rows (found by the corpus_id index) instead of the HNSW walk.
        # The distance is computed once per row, as the sort key (selected and ordered by
        # separately, a scanned row's vector was read from TOAST and compared twice).
        order = "embedding" if exact else f"embedding::vector({n})"
        sql = (
            f"SELECT id, corpus_id, {order} <=> %s::vector({n}) AS distance FROM rag_chunk "
            f"WHERE dims = {n} AND corpus_id = ANY(%s) ORDER BY distance LIMIT %s"
        )
        with connection.cursor() as cursor:
            _hnsw_settings(cursor, limit)
            cursor.execute(sql, [_vector_literal(query), list(corpus_ids), limit])
            rows = cursor.fetchall()
        # relaxed_order may return neighbours slightly out of order.
        return sorted(((int(i), int(c), 1 - float(d)) for i, c, d in rows), key=lambda r: -r[2])


def _hnsw_settings(cursor, limit: int) -> None:
    """Iterative index scans (a corpus filter still gets `limit` rows however small the
    corpus is among all chunks) and the search breadth, set once per connection (session
    settings, not a transaction around every query: one round trip per search)."""
    ef_search = max(EF_SEARCH, limit)
    raw = cursor.connection  # the driver's connection: lives as long as its settings
    if getattr(raw, "_rag_ef_search", 0) >= ef_search:
        return
    cursor.execute(
        "SELECT set_config('hnsw.iterative_scan', 'relaxed_order', false), "
        "set_config('hnsw.ef_search', %s, false)",
        [str(ef_search)],
    )
    raw._rag_ef_search = ef_search


class _Matrix:
    __slots__ = ("checked", "ids", "matrix", "version")

    def __init__(self, version: tuple, ids: np.ndarray, matrix: np.ndarray) -> None:
        self.version, self.ids, self.matrix = version, ids, matrix
        self.checked = time.monotonic()


class NumpyStore:
    def __init__(self) -> None:
        self._cache: dict[tuple[int, int], _Matrix] = {}
        self._lock = threading.Lock()

    def nearest(
        self,
        *,
        corpus_ids: list[int],
        dims: int,
        query: list[float],
        limit: int,
        exact: bool = False,
    ) -> Nearest:
        q = np.asarray(query, dtype=np.float32)
        q /= np.linalg.norm(q) or 1.0
        ids_parts, corpus_parts, score_parts = [], [], []
        for corpus_id in corpus_ids:
            m = self._matrix(corpus_id, dims)
            if len(m.ids):
                ids_parts.append(m.ids)
                corpus_parts.append(np.full(len(m.ids), corpus_id))
                score_parts.append(m.matrix @ q)
        if not ids_parts:
            return []
        ids, scores = np.concatenate(ids_parts), np.concatenate(score_parts)
        corpora = np.concatenate(corpus_parts)
        k = min(limit, len(ids))
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top])]
        return [(int(ids[i]), int(corpora[i]), float(scores[i])) for i in top]

    def _matrix(self, corpus_id: int, dims: int) -> _Matrix:
        cached = self._cache.get((corpus_id, dims))
        now = time.monotonic()
        if cached is not None and now - cached.checked < settings.RAG_NUMPY_REFRESH_SECONDS:
            return cached  # a document turned ready shows at most this much later
        version = _version(corpus_id, dims)
        if cached is not None and cached.version == version:
            cached.checked = now
            return cached
        rows = Chunk.objects.filter(corpus_id=corpus_id, dims=dims).values_list("id", "embedding")
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64) if rows else np.zeros(0, np.int64)
        if len(ids):
            matrix = np.vstack([np.asarray(r[1], dtype=np.float32) for r in rows])
            matrix /= np.linalg.norm(matrix, axis=1, keepdims=True).clip(min=1e-12)
        else:
            matrix = np.zeros((0, dims), dtype=np.float32)
        fresh = _Matrix(version, ids, matrix)
        with self._lock:
            self._cache[(corpus_id, dims)] = fresh
        return fresh


def _version(corpus_id: int, dims: int) -> tuple:
    """Changes whenever chunks are added to or removed from the corpus."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*), coalesce(max(id), 0), coalesce(sum(id), 0) FROM rag_chunk "
            "WHERE corpus_id = %s AND dims = %s",
            [corpus_id, dims],
        )
        return tuple(cursor.fetchone())


_stores: dict[str, VectorStore] = {}


def vector_store(name: str | None = None) -> VectorStore:
    """The configured store (or the one named), one instance per process."""
    name = name or settings.RAG_VECTOR_STORE
    if name not in _stores:
        if name == "pgvector":
            _stores[name] = PgVectorStore()
        elif name == "numpy":
            _stores[name] = NumpyStore()
        else:
            raise ValueError(f"RAG_VECTOR_STORE must be pgvector or numpy, not {name!r}")
    return _stores[name]
