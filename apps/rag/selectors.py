"""Reads of the rag app. Every lookup by a client-given id is filtered by tenant, so an id
of another tenant is indistinguishable from one that does not exist (404)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta

from django.db.models import Count, QuerySet, Sum

from apps.rag.models import AutoRag, Corpus, CorpusDay, Document, SessionRag, StoredFile
from apps.rag.usage import COLUMNS, today

STATS_DAYS = 14  # the admin's charts: this many UTC days, today included


class NotFound(Exception):
    """No such object for this tenant (whether it exists for another is not told)."""


@dataclass(frozen=True, slots=True)
class AutoRagDefault:
    corpus_ids: tuple[int, ...]
    top_k: int | None


def auto_rag_for_key(api_key) -> AutoRagDefault | None:
    """The key's own automatic RAG, else its tenant's; None when neither is on."""
    rows = {
        row.api_key_id: row
        for row in AutoRag.objects.filter(tenant_id=api_key.tenant_id).prefetch_related("corpora")
        if row.api_key_id in (None, api_key.pk)
    }
    row = rows.get(api_key.pk) or rows.get(None)
    if row is None or not row.enabled:
        return None
    return AutoRagDefault(
        corpus_ids=tuple(sorted(c.pk for c in row.corpora.all())), top_k=row.top_k
    )


def session_rag_in_use(api_key) -> bool:
    """Whether the key's tenant has set RAG on any session: only then do its session
    requests look their setting up (cached with the key, like AutoRag)."""
    return SessionRag.objects.filter(tenant_id=api_key.tenant_id).exists()


def session_rag_get(*, tenant_id: int, session_id: str) -> SessionRag:
    found = (
        SessionRag.objects.filter(tenant_id=tenant_id, session_id=session_id)
        .prefetch_related("corpora")
        .first()
    )
    if found is None:
        raise NotFound(f"No RAG setting for session '{session_id}'.")
    return found


def corpora_of(*, tenant_id: int) -> QuerySet[Corpus]:
    return Corpus.objects.filter(tenant_id=tenant_id)


def corpus_get(*, tenant_id: int, public_id: str) -> Corpus:
    corpus = Corpus.objects.filter(tenant_id=tenant_id, public_id=public_id).first()
    if corpus is None:
        raise NotFound(f"No vector store found with id '{public_id}'.")
    return corpus


def corpora_get(*, tenant_id: int, public_ids: list[str]) -> list[Corpus]:
    found = {
        c.public_id: c for c in Corpus.objects.filter(tenant_id=tenant_id, public_id__in=public_ids)
    }
    for public_id in public_ids:
        if public_id not in found:
            raise NotFound(f"No vector store found with id '{public_id}'.")
    return [found[p] for p in public_ids]


def documents_of(*, corpus: Corpus) -> QuerySet[Document]:
    return corpus.documents.select_related("file").order_by("-created_at", "-pk")


def document_get(*, corpus: Corpus, file_id: str) -> Document:
    document = corpus.documents.select_related("file").filter(file__public_id=file_id).first()
    if document is None:
        raise NotFound(f"No file found with id '{file_id}' in vector store '{corpus.public_id}'.")
    return document


def files_of(*, tenant_id: int) -> QuerySet[StoredFile]:
    return StoredFile.objects.filter(tenant_id=tenant_id).defer("data")


def file_get(*, tenant_id: int, public_id: str) -> StoredFile:
    stored = (
        StoredFile.objects.filter(tenant_id=tenant_id, public_id=public_id).defer("data").first()
    )
    if stored is None:
        raise NotFound(f"No such File object: {public_id}")
    return stored


def ingestion_backlog() -> dict[str, object]:
    """The ingestion queue as operators watch it (GET /health/detailed): jobs waiting and
    running, failed ones, and how long the oldest waiting job has waited (seconds)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FILTER (WHERE status = 'todo'),"
            " count(*) FILTER (WHERE status = 'doing'),"
            " count(*) FILTER (WHERE status = 'failed'),"
            # When the oldest waiting job was deferred (scheduled_at is only set for a
            # job deferred to later, so its 'deferred' event tells).
            " (SELECT extract(epoch FROM now() - min(e.at)) FROM procrastinate_events e"
            "  JOIN procrastinate_jobs w ON w.id = e.job_id"
            "  WHERE w.status = 'todo' AND e.type = 'deferred')"
            " FROM procrastinate_jobs"
        )
        waiting, running, failed, oldest = cursor.fetchone()
    return {
        "backend": "procrastinate",
        "waiting": waiting,
        "running": running,
        "failed": failed,
        "oldest_waiting_seconds": round(float(oldest), 1) if oldest is not None else None,
    }


@dataclass(frozen=True, slots=True)
class CorpusStats:
    """Corpora as operators chart them: now (documents by status, chunks stored) and per
    UTC day, oldest first (ingested documents and their chunks, failures, searches)."""

    statuses: dict[str, int]  # every status, in Document.Status order
    chunks: int
    days: list[date]
    documents_ingested: list[int]
    chunks_ingested: list[int]
    failures: list[int]
    searches: list[int]

    @property
    def documents(self) -> int:
        return sum(self.statuses.values())


def corpus_stats(*, corpora: QuerySet[Corpus], days: int = STATS_DAYS) -> CorpusStats:
    """Three aggregate queries, whatever the number of corpora, documents or chunks:
    chunks stored are summed over ready documents (as retrieval counts them), none for a
    corpus whose chunks expiry freed."""
    ids = corpora.order_by().values("pk")
    documents = Document.objects.filter(corpus__in=ids)
    by_status = dict(documents.values_list("status").annotate(n=Count("pk")).order_by())
    chunks = documents.filter(
        status=Document.Status.READY, corpus__expired_at__isnull=True
    ).aggregate(n=Sum("chunk_count"))["n"]
    first = today() - timedelta(days=days - 1)
    rows = {
        row["day"]: row
        for row in CorpusDay.objects.filter(corpus__in=ids, day__gte=first)
        .values("day")
        .annotate(**{f"total_{c}": Sum(c) for c in COLUMNS})
        .order_by()
    }
    span = [first + timedelta(days=i) for i in range(days)]

    def series(column: str) -> list[int]:
        return [int(rows[d][f"total_{column}"]) if d in rows else 0 for d in span]

    return CorpusStats(
        statuses={status: by_status.get(status, 0) for status in Document.Status.values},
        chunks=chunks or 0,
        days=span,
        documents_ingested=series("documents_ingested"),
        chunks_ingested=series("chunks_ingested"),
        failures=series("failures"),
        searches=series("searches"),
    )
