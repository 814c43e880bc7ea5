"""Ingest one document: extract → chunk → embed in batches → store, with progress.

Runs in a procrastinate job (apps/rag/tasks.py). The chunks are written, and the document
turns `ready`, in one transaction at the end, so retrieval sees all of a document or none
of it; a job run again (its worker crashed) starts over. Every failure ends `failed` with
a readable message and no chunks.

The embeddings are the corpus's tenant's engine work: each batch reserves its estimate in
the tenant's token quotas before the engine is asked and is charged what the engine
reports (apps/core/usage.py). A batch that does not fit stops the document (`failed`,
"Token quota exhausted: ..."): the batches before it stay charged (the engine did that
work), nothing more is spent, and the document can be queued again once the quota allows.
"""

from __future__ import annotations

import contextlib
import logging

from channels.db import database_sync_to_async as sync_to_async
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from apps.core.usage import EMBEDDINGS_INGESTION, Payer, UsageRefused
from apps.rag import engine, extraction
from apps.rag.chunking import HEURISTIC_CHARS_PER_TOKEN, Piece, chunk_sections
from apps.rag.indexes import hnsw_index_ensure
from apps.rag.models import Chunk, Corpus, Document
from apps.rag.services import document_progress
from apps.rag.usage import ingestion_record

logger = logging.getLogger(__name__)
TOKENIZER_SAMPLE_CHARS = 8000
Status = Document.Status


class Gone(Exception):
    """The document was deleted while it was being ingested."""


class Expired(Exception):
    """The document's corpus expired while it was being ingested."""


def _progress(document_id: int, **fields) -> None:
    if not document_progress(document_id=document_id, **fields):
        raise Gone


def _load(document_id: int) -> Document | None:
    return (
        Document.objects.select_related("corpus", "corpus__tenant", "file")
        .filter(pk=document_id)
        .first()
    )


async def ingest(*, document_id: int) -> None:
    document = await sync_to_async(_load)(document_id)
    if document is None or document.status == Status.READY:
        return  # deleted, or already done by an earlier run of this job
    try:
        await _ingest(document)
    except Gone:
        logger.info("document %s was deleted during ingestion", document_id)
    except (extraction.ExtractionError, engine.EngineError, Expired) as exc:
        await _fail(document_id, str(exc))
    except UsageRefused as refused:
        await _fail(document_id, f"Token quota exhausted: {refused}")
    except Exception as exc:
        logger.exception("ingestion of document %s failed", document_id)
        await _fail(document_id, f"Ingestion failed: {exc!r}")


def _fail_now(document_id: int, message: str) -> None:
    with transaction.atomic():
        _progress(document_id, status=Status.FAILED, error=message[:2000], chunks_embedded=0)
        corpus_id = Document.objects.filter(pk=document_id).values_list("corpus_id", flat=True)
        ingestion_record(corpus_id=corpus_id[0], failed=True)


async def _fail(document_id: int, message: str) -> None:
    with contextlib.suppress(Gone, IndexError):
        await sync_to_async(_fail_now)(document_id, message)


async def _ingest(document: Document) -> None:
    corpus = document.corpus
    await sync_to_async(_progress)(
        document.pk, status=Status.EXTRACTING, error="", chunk_count=0, chunks_embedded=0
    )
    data = bytes(document.file.data)
    sections = await sync_to_async(extraction.extract, thread_sensitive=False)(
        data, document.content_type
    )
    sample = sections[0].text[:TOKENIZER_SAMPLE_CHARS]
    ratio = await engine.chars_per_token(model=corpus.embedding_model, sample=sample)
    pieces = chunk_sections(
        sections,
        content_type=document.content_type,
        chunk_tokens=corpus.chunk_tokens,
        overlap_tokens=corpus.chunk_overlap,
        chars_per_token=ratio or HEURISTIC_CHARS_PER_TOKEN,
    )
    await sync_to_async(_progress)(document.pk, status=Status.EMBEDDING, chunk_count=len(pieces))
    vectors = await _embed(document, pieces)
    await sync_to_async(_store)(document, corpus, pieces, vectors)


async def _embed(document: Document, pieces: list[Piece]) -> list[list[float]]:
    vectors: list[list[float]] = []
    batch = max(1, settings.RAG_EMBED_BATCH)
    tenant = document.corpus.tenant
    payer = Payer(tenant_id=tenant.pk, tenant_slug=tenant.slug, weight=tenant.scheduling_weight)
    for start in range(0, len(pieces), batch):
        texts = [p.text for p in pieces[start : start + batch]]
        vectors += await engine.embed_with_retries(
            model=document.corpus.embedding_model,
            texts=texts,
            payer=payer,
            kind=EMBEDDINGS_INGESTION,
        )
        await sync_to_async(_progress)(document.pk, chunks_embedded=len(vectors))
    return vectors


def _store(
    document: Document, corpus: Corpus, pieces: list[Piece], vectors: list[list[float]]
) -> None:
    dims = len(vectors[0])
    with transaction.atomic():
        corpus = Corpus.objects.select_for_update().get(pk=corpus.pk)
        if corpus.is_expired():  # its chunks were freed (or are about to be): add none
            raise Expired(f"Vector store {corpus.public_id} expired before this file was ingested.")
        if corpus.embedding_dims is None:
            corpus.embedding_dims = dims
            corpus.save(update_fields=["embedding_dims"])
        elif corpus.embedding_dims != dims:
            raise engine.EngineError(
                f"The model `{corpus.embedding_model}` now returns {dims} dimensions; this corpus has {corpus.embedding_dims}.",
                transient=False,
            )
        if not Document.objects.select_for_update().filter(pk=document.pk).exists():
            raise Gone
        hnsw_index_ensure(dims=dims)
        Chunk.objects.filter(document_id=document.pk).delete()
        Chunk.objects.bulk_create(
            Chunk(
                document_id=document.pk,
                corpus_id=corpus.pk,
                position=i,
                text=p.text,
                token_count=p.token_count,
                char_start=p.char_start,
                char_end=p.char_end,
                page=p.page,
                dims=dims,
                embedding=v,
            )
            for i, (p, v) in enumerate(zip(pieces, vectors, strict=True))
        )
        Document.objects.filter(pk=document.pk).update(
            status=Status.READY, updated_at=timezone.now(), chunks_embedded=len(pieces)
        )
        ingestion_record(corpus_id=corpus.pk, chunks=len(pieces))  # counted once it is ready
