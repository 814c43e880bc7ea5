"""The native tenant API: /api/corpora, documents, search (API-key auth)."""

from __future__ import annotations

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from apps.rag.models import Chunk, Corpus, Document, StoredFile
from tests.rag.conftest import EMBED, RERANK, corpus_for, run_jobs
from tests.rag.files import pdf_bytes

pytestmark = pytest.mark.django_db(transaction=True)


def auth(key) -> dict:
    return {"HTTP_AUTHORIZATION": f"Bearer {key.raw_key}"}


def test_it_creates_lists_updates_and_deletes_corpora(rag_engine, client, alice):
    created = client.post(
        "/api/corpora",
        {"name": "handbook", "embedding_model": EMBED, "rerank_model": RERANK, "top_k": 3},
        content_type="application/json",
        **auth(alice),
    )
    assert created.status_code == 201, created.content
    body = created.json()
    assert body["id"].startswith("vs_")
    assert body["rerank_model"] == RERANK
    assert body["top_k"] == 3
    listed = client.get("/api/corpora", **auth(alice)).json()["data"]
    assert [c["id"] for c in listed] == [body["id"]]
    patched = client.patch(
        f"/api/corpora/{body['id']}", {"top_k": 7}, content_type="application/json", **auth(alice)
    )
    assert patched.json()["top_k"] == 7
    assert client.delete(f"/api/corpora/{body['id']}", **auth(alice)).json()["deleted"] is True
    assert not Corpus.objects.exists()


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "name"),
        ({"name": "x", "embedding_model": "nope"}, "embedding_model"),
        ({"name": "x", "top_k": "five"}, "top_k"),
        ({"name": "x", "chunk_tokens": 100, "chunk_overlap": 100}, "chunk_overlap"),
        ({"name": "x", "colour": "red"}, "colour"),
    ],
)
def test_it_refuses_bad_corpora(rag_engine, client, alice, body, param):
    resp = client.post("/api/corpora", body, content_type="application/json", **auth(alice))
    assert resp.status_code in (400, 404)
    assert resp.json()["error"]["param"] == param
    assert not Corpus.objects.exists()


def test_it_uploads_lists_searches_and_deletes_documents(rag_engine, client, alice):
    corpus = corpus_for(alice.tenant)
    files = [
        SimpleUploadedFile("otters.md", b"# Otters\n\nSea otters hold hands while they sleep."),
        SimpleUploadedFile("report.pdf", pdf_bytes(["Herons spear fish in shallow water."])),
    ]
    resp = client.post(f"/api/corpora/{corpus.public_id}/documents", {"file": files}, **auth(alice))
    assert resp.status_code == 201, resp.content
    assert [d["status"] for d in resp.json()["data"]] == ["queued", "queued"]
    run_jobs()
    docs = client.get(f"/api/corpora/{corpus.public_id}/documents", **auth(alice)).json()["data"]
    assert {(d["name"], d["status"], d["progress"]) for d in docs} == {
        ("otters.md", "ready", 100),
        ("report.pdf", "ready", 100),
    }
    found = client.post(
        f"/api/corpora/{corpus.public_id}/search",
        {"query": "herons spear fish", "top_k": 1},
        content_type="application/json",
        **auth(alice),
    ).json()["data"]
    assert [(s["id"], s["document"], s["page"]) for s in found] == [(1, "report.pdf", 1)]
    assert found[0]["score"] > 0
    assert "Herons" in found[0]["text"]
    pdf_id = found[0]["document_id"]
    assert (
        client.delete(
            f"/api/corpora/{corpus.public_id}/documents/{pdf_id}", **auth(alice)
        ).status_code
        == 200
    )
    assert set(Chunk.objects.values_list("document__name", flat=True)) == {"otters.md"}


def test_a_bad_file_in_a_batch_adds_none_of_it(rag_engine, client, alice):
    corpus = corpus_for(alice.tenant)
    files = [SimpleUploadedFile("ok.txt", b"fine text"), SimpleUploadedFile("empty.txt", b"")]
    resp = client.post(f"/api/corpora/{corpus.public_id}/documents", {"file": files}, **auth(alice))
    assert resp.status_code == 400
    assert resp.json()["error"]["message"] == "The file is empty."
    assert not Document.objects.exists()
    assert not StoredFile.objects.exists()


def test_it_refuses_search_without_a_query(rag_engine, client, alice):
    corpus = corpus_for(alice.tenant)
    resp = client.post(
        f"/api/corpora/{corpus.public_id}/search",
        {"query": " "},
        content_type="application/json",
        **auth(alice),
    )
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "query"


def test_another_tenants_corpora_are_404(rag_engine, client, alice, bob):
    corpus = corpus_for(alice.tenant)
    client.post(
        f"/api/corpora/{corpus.public_id}/documents",
        {"file": SimpleUploadedFile("a.txt", b"otters")},
        **auth(alice),
    )
    file_id = StoredFile.objects.get().public_id
    base = f"/api/corpora/{corpus.public_id}"
    assert client.get("/api/corpora", **auth(bob)).json()["data"] == []
    for method, path, data in [
        ("get", base, None),
        ("patch", base, {"top_k": 1}),
        ("delete", base, None),
        ("get", f"{base}/documents", None),
        ("post", f"{base}/documents", {"file": SimpleUploadedFile("b.txt", b"x")}),
        ("get", f"{base}/documents/{file_id}", None),
        ("delete", f"{base}/documents/{file_id}", None),
        ("post", f"{base}/search", {"query": "otters"}),
    ]:
        kwargs = (
            {"content_type": "application/json"}
            if method in ("patch",) or path.endswith("search")
            else {}
        )
        resp = (
            getattr(client, method)(path, data, **kwargs, **auth(bob))
            if data
            else getattr(client, method)(path, **auth(bob))
        )
        assert resp.status_code == 404, (method, path, resp.content)
    assert Corpus.objects.get().top_k == 5
    assert Document.objects.count() == 1


def test_it_needs_a_key(client):
    assert client.get("/api/corpora").status_code == 401
