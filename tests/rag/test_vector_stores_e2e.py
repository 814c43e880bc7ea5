"""OpenAI's files and vector-store API, driven by the official SDK against a real serve
process whose own ingestion worker embeds the files."""

from __future__ import annotations

import io

import httpx
import openai
import pytest

from apps.rag.models import Chunk, Corpus, StoredFile
from tests.rag.conftest import CHAT, RERANK
from tests.rag.files import pdf_bytes

pytestmark = pytest.mark.django_db(transaction=True)

OTTERS = b"# Otters\n\nSea otters hold hands while they sleep so they do not drift apart.\n"
BEES = b"# Bees\n\nHoney bees dance to tell the hive where the flowers are.\n"


def named(name: str, data: bytes) -> tuple[str, io.BytesIO]:
    return (name, io.BytesIO(data))


def test_it_creates_uploads_polls_and_searches_with_the_sdk(rag_engine, rag_client):
    store = rag_client.vector_stores.create(name="animals")
    assert store.id.startswith("vs_")
    assert store.status == "completed"
    corpus = Corpus.objects.get(public_id=store.id)
    # No RAG_EMBEDDING_MODEL: the first model (by name) whose engine answers /v1/embeddings.
    assert corpus.embedding_model == CHAT
    done = rag_client.vector_stores.files.upload_and_poll(
        vector_store_id=store.id, file=named("otters.md", OTTERS), poll_interval_ms=100
    )
    assert (done.status, done.last_error, done.vector_store_id) == ("completed", None, store.id)
    rag_client.vector_stores.files.upload_and_poll(
        vector_store_id=store.id, file=named("bees.md", BEES), poll_interval_ms=100
    )
    results = rag_client.vector_stores.search(
        vector_store_id=store.id, query="why do otters hold hands?"
    )
    first = results.data[0]
    assert first.filename == "otters.md"
    assert first.file_id == done.id
    assert "hold hands" in first.content[0].text
    assert first.score > results.data[1].score
    store = rag_client.vector_stores.retrieve(store.id)
    assert store.file_counts.completed == 2
    assert store.usage_bytes == len(OTTERS) + len(BEES)
    listed = rag_client.vector_stores.files.list(vector_store_id=store.id)
    assert {f.id for f in listed.data} == {done.id, *(f.id for f in listed.data)}
    assert len(listed.data) == 2


def test_it_attaches_uploaded_files_and_reports_failures(rag_engine, rag_client):
    good = rag_client.files.create(
        file=named("report.pdf", pdf_bytes(["Herons spear fish."])), purpose="assistants"
    )
    broken = rag_client.files.create(
        file=named("broken.pdf", b"%PDF-1.4\n" + b"\x00junk" * 40), purpose="assistants"
    )
    assert good.object == "file"
    assert good.bytes > 0
    assert good.filename == "report.pdf"
    store = rag_client.vector_stores.create(name="reports", file_ids=[good.id])
    failed = rag_client.vector_stores.files.create_and_poll(
        vector_store_id=store.id, file_id=broken.id, poll_interval_ms=100
    )
    assert failed.status == "failed"
    assert failed.last_error.code == "invalid_file"
    assert failed.last_error.message
    ok = rag_client.vector_stores.files.poll(
        good.id, vector_store_id=store.id, poll_interval_ms=100
    )
    assert ok.status == "completed"
    hit = rag_client.vector_stores.search(vector_store_id=store.id, query="herons").data[0]
    assert hit.attributes == {"page": 1}
    assert not Chunk.objects.filter(document__file__public_id=broken.id).exists()


def test_it_deletes_files_stores_and_their_chunks(rag_engine, rag_client):
    store = rag_client.vector_stores.create(name="tmp")
    f = rag_client.vector_stores.files.upload_and_poll(
        vector_store_id=store.id, file=named("o.md", OTTERS), poll_interval_ms=100
    )
    deleted = rag_client.vector_stores.files.delete(file_id=f.id, vector_store_id=store.id)
    assert deleted.deleted
    assert Chunk.objects.count() == 0
    assert rag_client.files.retrieve(f.id).id == f.id  # the file outlives the store entry
    assert rag_client.files.delete(f.id).deleted
    assert not StoredFile.objects.exists()
    assert rag_client.vector_stores.delete(store.id).deleted
    with pytest.raises(openai.NotFoundError):
        rag_client.vector_stores.retrieve(store.id)


def test_it_takes_corpus_settings_through_extra_body(rag_engine, rag_client):
    store = rag_client.vector_stores.create(
        name="tuned",
        chunking_strategy={
            "type": "static",
            "static": {"max_chunk_size_tokens": 100, "chunk_overlap_tokens": 20},
        },
        extra_body={"rerank_model": RERANK, "top_k": 3},
    )
    corpus = Corpus.objects.get(public_id=store.id)
    assert (corpus.chunk_tokens, corpus.chunk_overlap, corpus.rerank_model, corpus.top_k) == (
        100,
        20,
        RERANK,
        3,
    )


@pytest.mark.parametrize(
    ("name", "data", "status", "message"),
    [
        ("empty.txt", b"", 400, "The file is empty."),
        (
            "image.png",
            b"\x89PNG\r\n\x1a\n" + b"\x00" * 64,
            400,
            "Unsupported file type (image/png)",
        ),
    ],
)
def test_it_refuses_bad_uploads_with_openai_errors(
    rag_engine, rag_gateway, alice, name, data, status, message
):
    resp = httpx.post(
        f"{rag_gateway.base_url}/files",
        headers=alice.auth,
        files={"file": (name, data)},
        data={"purpose": "assistants"},
    )
    assert resp.status_code == status
    assert message in resp.json()["error"]["message"]
    assert resp.json()["error"]["param"] == "file"
    assert not StoredFile.objects.exists()


def test_it_refuses_oversized_uploads_and_bad_purposes(rag_engine, rag_client):
    with pytest.raises(openai.BadRequestError, match="purpose"):
        rag_client.files.create(file=named("a.txt", b"x"), purpose="fine-tune")
    with pytest.raises(openai.APIStatusError, match="too large") as info:
        rag_client.files.create(
            file=named("big.txt", b"x" * (21 * 1024 * 1024)), purpose="assistants"
        )
    assert info.value.status_code == 413
    assert not StoredFile.objects.exists()


def test_unknown_ids_are_404s(rag_engine, rag_client):
    with pytest.raises(openai.NotFoundError):
        rag_client.vector_stores.search(vector_store_id="vs_nope", query="x")
    with pytest.raises(openai.NotFoundError):
        rag_client.vector_stores.create(name="x", file_ids=["file-nope"])
    assert not Corpus.objects.exists()


def test_another_tenant_sees_and_reaches_nothing(rag_engine, rag_client, rag_gateway, bob):
    store = rag_client.vector_stores.create(name="alice's")
    f = rag_client.vector_stores.files.upload_and_poll(
        vector_store_id=store.id, file=named("o.md", OTTERS), poll_interval_ms=100
    )
    other = openai.OpenAI(base_url=rag_gateway.base_url, api_key=bob.raw_key, max_retries=0)
    assert other.vector_stores.list().data == []
    assert other.files.list().data == []
    calls = [
        lambda: other.vector_stores.retrieve(store.id),
        lambda: other.vector_stores.search(vector_store_id=store.id, query="otters"),
        lambda: other.vector_stores.files.list(vector_store_id=store.id),
        lambda: other.vector_stores.files.retrieve(file_id=f.id, vector_store_id=store.id),
        lambda: other.vector_stores.files.delete(file_id=f.id, vector_store_id=store.id),
        lambda: other.vector_stores.delete(store.id),
        lambda: other.files.retrieve(f.id),
        lambda: other.files.delete(f.id),
    ]
    for call in calls:
        with pytest.raises(openai.NotFoundError):
            call()
    bobs = other.vector_stores.create(name="bob's")
    with pytest.raises(openai.NotFoundError):  # alice's file into bob's store
        other.vector_stores.files.create(vector_store_id=bobs.id, file_id=f.id)
    assert Chunk.objects.filter(corpus__public_id=store.id).exists()


def test_it_needs_a_key(rag_gateway):
    resp = httpx.get(f"{rag_gateway.base_url}/vector_stores")
    assert resp.status_code == 401
    assert resp.json()["error"]["code"] == "invalid_api_key"
