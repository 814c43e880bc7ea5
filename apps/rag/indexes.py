"""One partial HNSW index per embedding dimension in use (see apps/rag/models.py).

pgvector indexes vectors of at most HNSW_MAX_DIMS dimensions; larger embeddings are
searched exactly (a scan of the corpus's chunks), which the admin can see in EXPLAIN.
"""

from __future__ import annotations

from django.db import connection, transaction

HNSW_MAX_DIMS = 2000
_known: set[int] = set()


def index_name(dims: int) -> str:
    return f"rag_chunk_hnsw_{dims}"


def hnsw_index_ensure(*, dims: int) -> None:
    """Create the index for `dims` if it is missing (once per process and dimension).

    Serialized by an advisory lock so two workers never race on the same CREATE."""
    if dims in _known or not 0 < dims <= HNSW_MAX_DIMS:
        return
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(hashtext('rag_chunk_hnsw'))")
        cursor.execute(
            f"CREATE INDEX IF NOT EXISTS {index_name(int(dims))} ON rag_chunk "
            f"USING hnsw ((embedding::vector({int(dims)})) vector_cosine_ops) "
            f"WHERE dims = {int(dims)}"
        )
    _known.add(dims)
