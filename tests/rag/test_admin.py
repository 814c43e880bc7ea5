"""The operator's admin pages for corpora, documents, files and automatic RAG."""

from __future__ import annotations

import pytest
from django.urls import reverse

from apps.rag.models import AutoRag, Document
from tests.rag.conftest import corpus_for, upload

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff(admin_client):
    return admin_client


def test_the_pages_list_corpora_documents_and_their_failures(rag_engine, alice, staff):
    corpus = corpus_for(alice.tenant, name="Handbook")
    doc = upload(corpus, "broken.pdf", b"%PDF-1.4 junk")
    Document.objects.filter(pk=doc.pk).update(
        status="failed", error="The PDF could not be read: EOF marker not found"
    )
    corpora = staff.get(reverse("admin:rag_corpus_changelist")).content.decode()
    assert "Handbook" in corpora
    assert corpus.public_id in corpora
    docs = staff.get(reverse("admin:rag_document_changelist") + "?status=failed").content.decode()
    assert "broken.pdf" in docs
    assert "EOF marker not found" in docs
    page = staff.get(reverse("admin:rag_corpus_change", args=[corpus.pk])).content.decode()
    assert "broken.pdf" in page
    assert "EOF marker not found" in page
    assert staff.get(reverse("admin:rag_storedfile_changelist")).status_code == 200


def test_it_queues_failed_documents_again(rag_engine, alice, staff):
    from django.db import connection

    corpus = corpus_for(alice.tenant)
    doc = upload(corpus, "a.txt", b"otters")
    Document.objects.filter(pk=doc.pk).update(status="failed", error="engine down")
    staff.post(
        reverse("admin:rag_document_changelist"),
        {"action": "ingest_again", "_selected_action": [doc.pk]},
    )
    doc.refresh_from_db()
    assert (doc.status, doc.error) == ("queued", "")
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM procrastinate_jobs WHERE task_name = 'rag.ingest_document'"
        )
        assert cursor.fetchone()[0] == 2


def test_automatic_rag_takes_only_the_tenants_own_corpora(rag_engine, alice, bob, staff):
    own, other = corpus_for(alice.tenant, name="own"), corpus_for(bob.tenant, name="bobs")
    url = reverse("admin:rag_autorag_add")
    resp = staff.post(
        url, {"tenant": alice.tenant.pk, "enabled": "on", "corpora": [own.pk, other.pk]}
    )
    assert resp.status_code == 200
    assert "Not corpora of this tenant: bobs" in resp.content.decode()
    staff.post(url, {"tenant": alice.tenant.pk, "enabled": "on", "corpora": [own.pk]})
    assert list(AutoRag.objects.get().corpora.all()) == [own]
