"""The document pages without a browser: isolation and permissions for every page."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.utils import timezone

from apps.rag.models import Corpus, Document
from tests.rag.conftest import EMBED, corpus_for, upload
from tests.rag.test_pages_browser import member

pytestmark = pytest.mark.django_db


@pytest.fixture
def setup(rag_engine, alice, bob, client):
    corpus = corpus_for(alice.tenant)
    doc = upload(corpus, "a.txt", b"otters hold hands")
    member(alice.tenant, "ann", "editor")
    member(alice.tenant, "vic", "viewer")
    member(bob.tenant, "bert", "editor")
    return corpus, doc


def pages(corpus, doc):
    base = f"/rag/{corpus.public_id}"
    return [
        ("get", f"{base}/"),
        ("get", f"{base}/documents.json"),
        ("post", f"{base}/upload"),
        ("post", f"{base}/documents/{doc.file.public_id}/delete"),
    ]


def test_every_page_needs_a_login(setup, client):
    for method, path in [("get", "/rag/"), *pages(*setup)]:
        resp = getattr(client, method)(path)
        assert resp.status_code == 302, path
        assert resp["Location"].startswith("/rag/login/"), path


def test_another_tenants_user_gets_404_everywhere(setup, client):
    client.login(username="bert", password="a-long-test-password")
    for method, path in pages(*setup):
        assert getattr(client, method)(path).status_code == 404, path
    corpus, _ = setup
    assert corpus.public_id not in client.get("/rag/").content.decode()
    assert (
        client.post("/rag/corpora/new", {"tenant": corpus.tenant_id, "name": "x"}).status_code
        == 404
    )
    assert Document.objects.count() == 1
    assert Corpus.objects.count() == 1


def test_a_viewer_may_not_change_anything(setup, client):
    corpus, doc = setup
    client.login(username="vic", password="a-long-test-password")
    assert client.get(f"/rag/{corpus.public_id}/").status_code == 200
    for _, path in pages(corpus, doc)[2:]:
        assert client.post(path).status_code == 403
    assert (
        client.post("/rag/corpora/new", {"tenant": corpus.tenant_id, "name": "x"}).status_code
        == 403
    )
    assert Document.objects.count() == 1


def test_an_editor_creates_a_corpus_and_sees_form_errors(setup, client):
    corpus, _ = setup
    client.login(username="ann", password="a-long-test-password")
    resp = client.post(
        "/rag/corpora/new",
        {"tenant": corpus.tenant_id, "name": "Manuals", "embedding_model": EMBED},
    )
    assert resp.status_code == 302
    assert Corpus.objects.filter(name="Manuals").exists()
    bad = client.post(
        "/rag/corpora/new", {"tenant": corpus.tenant_id, "name": " ", "embedding_model": EMBED}
    )
    assert bad.status_code == 400
    assert "non-empty" in bad.content.decode()


def test_uploads_are_csrf_protected(setup):
    from django.test import Client

    corpus, _ = setup
    strict = Client(enforce_csrf_checks=True)
    strict.login(username="ann", password="a-long-test-password")
    resp = strict.post(
        f"/rag/{corpus.public_id}/upload", {"file": SimpleUploadedFile("b.txt", b"beavers")}
    )
    assert resp.status_code == 403
    assert Document.objects.count() == 1


def test_the_page_refuses_to_search_an_expired_corpus(setup, client):
    corpus, _ = setup
    Corpus.objects.filter(pk=corpus.pk).update(
        expires_after_days=1, last_active_at=timezone.now() - timedelta(days=2)
    )
    client.login(username="vic", password="a-long-test-password")
    page = client.get(f"/rag/{corpus.public_id}/", {"q": "otters"}).content.decode()
    assert f"Vector store {corpus.public_id} has expired" in page
