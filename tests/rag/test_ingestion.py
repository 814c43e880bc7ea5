from __future__ import annotations

import pytest
from django.db import connection

from apps.rag.models import Chunk, Document, StoredFile
from apps.rag.services import RagError, corpus_delete, document_delete, document_upload
from tests.rag.conftest import DIMS, EMBED, corpus_for, run_jobs, upload
from tests.rag.files import docx_bytes, pdf_bytes

pytestmark = pytest.mark.django_db(transaction=True)

OTTERS = (
    "# Otters\n\nSea otters hold hands while they sleep.\n\n" + "They eat urchins and crabs. " * 40
)


def test_it_ingests_every_supported_type_to_ready(rag_engine, alice):
    corpus = corpus_for(alice.tenant, chunk_tokens=64, chunk_overlap=8)
    docs = [
        upload(corpus, "otters.md", OTTERS.encode()),
        upload(corpus, "notes.txt", b"Plain text notes about beavers building dams."),
        upload(
            corpus, "report.pdf", pdf_bytes(["Page one about herons.", "Page two about egrets."])
        ),
        upload(corpus, "memo.docx", docx_bytes(["A memo about kingfishers."])),
    ]
    assert {d.status for d in docs} == {"queued"}
    run_jobs()
    for doc in docs:
        doc.refresh_from_db()
        assert (doc.status, doc.error, doc.progress) == ("ready", "", 100)
        assert doc.chunk_count == doc.chunks.count() == doc.chunks_embedded > 0
    assert Chunk.objects.filter(document=docs[0]).count() > 3  # 64-token chunks
    pages = list(Chunk.objects.filter(document=docs[2]).values_list("page", flat=True))
    assert pages == [1, 2]
    corpus.refresh_from_db()
    assert corpus.embedding_dims == DIMS
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT indexdef FROM pg_indexes WHERE indexname = %s", [f"rag_chunk_hnsw_{DIMS}"]
        )
        (indexdef,) = cursor.fetchone()
    assert "hnsw" in indexdef
    assert f"vector({DIMS})" in indexdef
    assert f"dims = {DIMS}" in indexdef


def test_it_embeds_in_batches_through_the_engine(rag_engine, rag_fake_engine, alice, settings):
    settings.RAG_EMBED_BATCH = 4
    corpus = corpus_for(alice.tenant, chunk_tokens=32, chunk_overlap=0)
    doc = upload(corpus, "otters.md", OTTERS.encode())
    run_jobs()
    doc.refresh_from_db()
    calls = [r for r in rag_fake_engine.requests() if r["path"] == "/v1/embeddings"]
    assert len(calls) == -(-doc.chunk_count // 4)
    assert all(c["body"]["model"] == EMBED and len(c["body"]["input"]) <= 4 for c in calls)


def test_it_does_not_duplicate_the_same_file(rag_engine, alice):
    corpus = corpus_for(alice.tenant)
    first = upload(corpus, "a.txt", b"same bytes about otters")
    second, created = document_upload(
        corpus=corpus, filename="b.txt", data=b"same bytes about otters"
    )
    assert (second.pk, created) == (first.pk, False)
    assert corpus.documents.count() == 1
    assert StoredFile.objects.count() == 1


def test_a_corrupt_pdf_ends_failed_with_no_chunks(rag_engine, alice):
    corpus = corpus_for(alice.tenant)
    doc = upload(corpus, "broken.pdf", b"%PDF-1.7\n" + b"\x00garbage" * 50)
    run_jobs()
    doc.refresh_from_db()
    assert doc.status == "failed"
    assert doc.error
    assert doc.chunks.count() == 0


def test_a_permanent_engine_error_fails_the_document(rag_engine, alice, settings):
    settings.RAG_EMBED_RETRIES = 0
    corpus = corpus_for(alice.tenant)
    rag_engine.delete()  # the model is no longer served
    doc = upload(corpus, "a.txt", b"text about otters")
    run_jobs()
    doc.refresh_from_db()
    assert doc.status == "failed"
    assert "not served by any engine" in doc.error
    assert Chunk.objects.count() == 0


def test_it_retries_transient_engine_errors_then_fails_clearly(
    rag_engine, rag_fake_engine, alice, settings
):
    from apps.engines.models import Engine

    settings.RAG_EMBED_RETRIES, settings.RAG_EMBED_RETRY_SECONDS = 2, 0.01
    corpus = corpus_for(alice.tenant)
    Engine.objects.filter(pk=rag_engine.pk).update(base_url="http://127.0.0.1:9")  # refused
    doc = upload(corpus, "a.txt", b"text about otters")
    run_jobs()
    doc.refresh_from_db()
    assert doc.status == "failed"
    assert "unreachable" in doc.error


def test_deleting_a_document_or_a_corpus_removes_its_chunks(rag_engine, alice):
    corpus = corpus_for(alice.tenant)
    kept = upload(corpus, "a.txt", b"otters hold hands")
    gone = upload(corpus, "b.txt", b"beavers build dams")
    run_jobs()
    document_delete(document=gone)
    assert set(Chunk.objects.values_list("document_id", flat=True)) == {kept.pk}
    assert StoredFile.objects.count() == 1
    corpus_delete(corpus=corpus)
    assert Chunk.objects.count() == 0
    assert Document.objects.count() == 0


def test_it_refuses_oversized_files_and_full_corpora_writing_nothing(rag_engine, alice, settings):
    corpus = corpus_for(alice.tenant)
    settings.RAG_MAX_FILE_BYTES = 10
    with pytest.raises(RagError, match="too large"):
        upload(corpus, "big.txt", b"x" * 11)
    settings.RAG_MAX_FILE_BYTES, settings.RAG_MAX_DOCUMENTS_PER_CORPUS = 1000, 1
    upload(corpus, "a.txt", b"one")
    with pytest.raises(RagError, match="already has 1 documents"):
        upload(corpus, "b.txt", b"two")
    assert StoredFile.objects.count() == 1
    assert corpus.documents.count() == 1


def test_a_crashed_workers_job_runs_again(rag_engine, alice, settings):
    """A job left `doing` by a worker that stopped sending heartbeats is retried."""
    settings.RAG_STALLED_JOB_SECONDS = 0
    corpus = corpus_for(alice.tenant)
    doc = upload(corpus, "a.txt", b"otters hold hands")
    with connection.cursor() as cursor:  # what a worker that died mid-job leaves behind
        cursor.execute(
            "INSERT INTO procrastinate_workers (last_heartbeat) VALUES (now() - interval '1 hour') RETURNING id"
        )
        (worker_id,) = cursor.fetchone()
        cursor.execute(
            "UPDATE procrastinate_jobs SET status = 'doing', worker_id = %s WHERE task_name = %s",
            [worker_id, "rag.ingest_document"],
        )
    run_jobs()
    doc.refresh_from_db()
    assert doc.status == "ready"
