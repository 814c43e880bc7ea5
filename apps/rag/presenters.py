"""JSON shapes of corpora, documents and files: native (/api) and OpenAI's (/v1)."""

from __future__ import annotations

from typing import Any

from django.db.models import Count, Q, Sum

from apps.rag.models import Corpus, Document, StoredFile

IN_PROGRESS = (Document.Status.QUEUED, Document.Status.EXTRACTING, Document.Status.EMBEDDING)
VS_STATUS = {
    Document.Status.QUEUED: "in_progress",
    Document.Status.EXTRACTING: "in_progress",
    Document.Status.EMBEDDING: "in_progress",
    Document.Status.READY: "completed",
    Document.Status.FAILED: "failed",
}


def _ts(value) -> int:
    return int(value.timestamp())


def document_counts(corpus: Corpus) -> dict[str, int]:
    counts = corpus.documents.aggregate(
        total=Count("pk"),
        in_progress=Count("pk", filter=Q(status__in=IN_PROGRESS)),
        completed=Count("pk", filter=Q(status=Document.Status.READY)),
        failed=Count("pk", filter=Q(status=Document.Status.FAILED)),
        usage_bytes=Sum("size"),
    )
    counts["usage_bytes"] = counts["usage_bytes"] or 0
    return counts


def corpus_json(corpus: Corpus) -> dict[str, Any]:
    counts = document_counts(corpus)
    return {
        "id": corpus.public_id,
        "object": "corpus",
        "name": corpus.name,
        "description": corpus.description,
        "embedding_model": corpus.embedding_model,
        "embedding_dims": corpus.embedding_dims,
        "chunk_tokens": corpus.chunk_tokens,
        "chunk_overlap": corpus.chunk_overlap,
        "top_k": corpus.top_k,
        "rerank_model": corpus.rerank_model or None,
        "hybrid_weight": corpus.hybrid_weight,
        "score_threshold": corpus.score_threshold,
        "metadata": corpus.metadata,
        "created_at": _ts(corpus.created_at),
        "status": "expired" if corpus.is_expired() else "active",
        **expiry_json(corpus),
        "document_counts": {k: v for k, v in counts.items() if k != "usage_bytes"},
        "usage_bytes": counts["usage_bytes"],
    }


def document_json(document: Document) -> dict[str, Any]:
    return {
        "id": document.file.public_id,
        "object": "document",
        "corpus_id": document.corpus.public_id,
        "name": document.name,
        "content_type": document.content_type,
        "size": document.size,
        "sha256": document.sha256,
        "status": document.status,
        "error": document.error or None,
        "progress": document.progress,
        "chunk_count": document.chunk_count,
        "chunks_embedded": document.chunks_embedded,
        "created_at": _ts(document.created_at),
    }


def expiry_json(corpus: Corpus) -> dict[str, Any]:
    """OpenAI's expiry fields of a vector store."""
    days, expires_at = corpus.expires_after_days, corpus.expires_at
    return {
        "last_active_at": _ts(corpus.last_active_at),
        "expires_after": None if days is None else {"anchor": "last_active_at", "days": days},
        "expires_at": None if expires_at is None else _ts(expires_at),
    }


def vector_store_json(corpus: Corpus) -> dict[str, Any]:
    counts = document_counts(corpus)
    if corpus.is_expired():
        status = "expired"
    else:
        status = "in_progress" if counts["in_progress"] else "completed"
    return {
        "id": corpus.public_id,
        "object": "vector_store",
        "created_at": _ts(corpus.created_at),
        "name": corpus.name,
        "usage_bytes": counts.pop("usage_bytes"),
        "file_counts": {**counts, "cancelled": 0},
        "status": status,
        "metadata": corpus.metadata or {},
        **expiry_json(corpus),
    }


def vector_store_file_json(document: Document) -> dict[str, Any]:
    last_error = None
    if document.status == Document.Status.FAILED:
        code = "server_error" if document.error.startswith("Engine") else "invalid_file"
        last_error = {"code": code, "message": document.error}
    return {
        "id": document.file.public_id,
        "object": "vector_store.file",
        "created_at": _ts(document.created_at),
        "vector_store_id": document.corpus.public_id,
        "status": VS_STATUS[document.status],
        "last_error": last_error,
        "usage_bytes": document.size,
        "attributes": {},
        "chunking_strategy": {
            "type": "static",
            "static": {
                "max_chunk_size_tokens": document.corpus.chunk_tokens,
                "chunk_overlap_tokens": document.corpus.chunk_overlap,
            },
        },
    }


def file_json(stored: StoredFile) -> dict[str, Any]:
    return {
        "id": stored.public_id,
        "object": "file",
        "bytes": stored.size,
        "created_at": _ts(stored.created_at),
        "filename": stored.filename,
        "purpose": stored.purpose,
        "status": "processed",
        "status_details": None,
        "expires_at": None,
    }


def list_json(items: list[dict[str, Any]], *, has_more: bool = False) -> dict[str, Any]:
    return {
        "object": "list",
        "data": items,
        "first_id": items[0]["id"] if items else None,
        "last_id": items[-1]["id"] if items else None,
        "has_more": has_more,
    }


def session_rag_json(setting: Any) -> dict[str, Any]:
    return {
        "object": "session.rag",
        "session_id": setting.session_id,
        "enabled": setting.enabled,
        "corpora": sorted(c.public_id for c in setting.corpora.all()),
        "top_k": setting.top_k,
        "updated_at": int(setting.updated_at.timestamp()),
    }
