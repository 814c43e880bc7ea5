"""The corpus admin's figures and charts: documents by status, chunks stored, ingestion
(documents, failures, chunks) and searches per day, for the corpora listed (following the
list's filters) and for one corpus; only for staff allowed to view corpora. Searches are
counted where they happen: the tenant API, the OpenAI API, the page, chat RAG (a real
gateway, in batches)."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission
from django.urls import reverse
from django.utils import timezone

from apps.rag.models import Corpus, CorpusDay, Document
from apps.rag.usage import today
from tests.conftest import wait_until
from tests.rag.conftest import CHAT, corpus_for, run_jobs, upload

pytestmark = pytest.mark.django_db(transaction=True)

OTTERS = b"Sea otters hold hands while they sleep so they do not drift apart."
BEES = b"Honey bees dance to tell the hive where the flowers are."


def auth(key) -> dict:
    return {"HTTP_AUTHORIZATION": f"Bearer {key.raw_key}"}


def search(client, key, corpus: Corpus, *, openai: bool = False):
    path = (
        f"/v1/vector_stores/{corpus.public_id}/search"
        if openai
        else f"/api/corpora/{corpus.public_id}/search"
    )
    resp = client.post(path, {"query": "otters"}, content_type="application/json", **auth(key))
    assert resp.status_code == 200, resp.content


def titles(html: str, chart: str) -> list[str]:
    svg = re.search(rf'<svg[^>]*id="rag-chart-{chart}".*?</svg>', html, re.S).group(0)
    return re.findall(r"<title>([^<]*)</title>", svg)


def figure(html: str, name: str) -> int:
    return int(re.search(rf'<strong id="rag-{name}">(\d+)</strong>', html).group(1))


def chunks_of(corpus: Corpus) -> int:
    return sum(Document.objects.filter(corpus=corpus, status="ready").values_list(
        "chunk_count", flat=True))  # fmt: skip


@pytest.fixture
def corpora(rag_engine, client, alice, bob):
    """alice's handbook: 2 ingested, 1 failed, 1 queued, 3 searches today; bob's notes: 1
    ingested, 1 search today and 5 three days ago."""
    handbook = corpus_for(alice.tenant, name="handbook")
    upload(handbook, "otters.txt", OTTERS)
    upload(handbook, "bees.txt", BEES)
    upload(handbook, "broken.pdf", b"%PDF-1.4 junk")
    notes = corpus_for(bob.tenant, name="notes")
    upload(notes, "otters.txt", OTTERS)
    run_jobs()
    upload(handbook, "later.txt", b"Not ingested yet.")
    search(client, alice, handbook)
    search(client, alice, handbook)
    search(client, alice, handbook, openai=True)
    search(client, bob, notes)
    CorpusDay.objects.create(corpus=notes, day=today() - timedelta(days=3), searches=5)
    return handbook, notes


def test_the_list_charts_all_corpora_and_follows_its_filters(corpora, admin_client, alice):
    handbook, notes = corpora
    html = admin_client.get(reverse("admin:rag_corpus_changelist")).content.decode()
    assert 'data-status="ready">3 ready' in html
    assert 'data-status="failed">1 failed' in html
    assert 'data-status="queued">1 queued' in html
    assert figure(html, "chunks") == chunks_of(handbook) + chunks_of(notes) > 0
    assert (figure(html, "ingested"), figure(html, "failures")) == (3, 1)
    assert figure(html, "searches") == 4 + 5
    day = today().isoformat()
    assert titles(html, "statuses") == [
        "queued: 1 documents", "extracting: 0 documents", "embedding: 0 documents",
        "ready: 3 documents", "failed: 1 documents",
    ]  # fmt: skip
    ingested = titles(html, "ingested")
    assert len(ingested) == 14
    assert ingested[-1] == f"{day}: 3 ingested + 1 failed"
    assert ingested[-2].endswith(": 0 ingested + 0 failed")
    chunks = chunks_of(handbook) + chunks_of(notes)
    assert titles(html, "chunks")[-1] == f"{day}: {chunks:,} chunks"
    searches = titles(html, "searches")
    assert searches[-1] == f"{day}: 4 searches"
    assert searches[-4] == f"{(today() - timedelta(days=3)).isoformat()}: 5 searches"

    only_alice = admin_client.get(
        reverse("admin:rag_corpus_changelist"), {"tenant__id__exact": alice.tenant.pk}
    ).content.decode()
    assert figure(only_alice, "searches") == 3
    assert figure(only_alice, "chunks") == chunks_of(handbook)
    assert titles(only_alice, "ingested")[-1] == f"{day}: 2 ingested + 1 failed"


def test_a_corpus_page_charts_that_corpus(corpora, admin_client):
    _, notes = corpora
    html = admin_client.get(reverse("admin:rag_corpus_change", args=[notes.pk])).content.decode()
    assert 'data-status="ready">1 ready' in html
    assert 'data-status="failed">0 failed' in html
    assert figure(html, "chunks") == chunks_of(notes)
    assert (figure(html, "ingested"), figure(html, "failures"), figure(html, "searches")) == (
        1, 0, 6,
    )  # fmt: skip
    assert titles(html, "searches")[-1] == f"{today().isoformat()}: 1 searches"
    assert "broken.pdf" not in html  # the handbook's


def test_an_expired_corpus_stores_no_chunks(corpora, admin_client):
    from apps.rag.services import corpora_expire

    handbook, notes = corpora
    Corpus.objects.filter(pk=notes.pk).update(
        expires_after_days=1, last_active_at=timezone.now() - timedelta(days=5)
    )
    assert corpora_expire() == 1
    html = admin_client.get(reverse("admin:rag_corpus_change", args=[notes.pk])).content.decode()
    assert figure(html, "chunks") == 0
    listing = admin_client.get(reverse("admin:rag_corpus_changelist")).content.decode()
    assert figure(listing, "chunks") == chunks_of(handbook)


def test_staff_without_the_view_permission_see_no_chart(corpora, client, django_user_model):
    handbook, _ = corpora
    pages = [
        reverse("admin:rag_corpus_changelist"),
        reverse("admin:rag_corpus_change", args=[handbook.pk]),
    ]
    staff = django_user_model.objects.create_user("op", password="pw-123456789", is_staff=True)
    staff.user_permissions.add(Permission.objects.get(codename="view_document"))
    client.force_login(staff)
    for page in pages:
        resp = client.get(page)
        assert resp.status_code == 403, page
        assert b"rag-chart" not in resp.content
    staff.user_permissions.add(Permission.objects.get(codename="view_corpus"))
    staff = django_user_model.objects.get(pk=staff.pk)  # the permissions cache
    client.force_login(staff)
    for page in pages:
        resp = client.get(page)
        assert resp.status_code == 200, page
        assert 'id="rag-chart-searches"' in resp.content.decode()


def test_the_page_search_counts(corpora, client):
    from tests.rag.test_pages_browser import member

    handbook, _ = corpora
    member(handbook.tenant, "vic", "viewer")
    assert client.login(username="vic", password="a-long-test-password")
    assert client.get(f"/rag/{handbook.public_id}/", {"q": "otters"}).status_code == 200
    assert CorpusDay.objects.get(corpus=handbook, day=today()).searches == 4


def test_chat_rag_searches_are_counted_in_batches(rag_engine, rag_client, alice):
    """Through a real gateway: each chat completion with RAG counts one search of each
    corpus it named, written by the gateway a moment later."""
    one, two = corpus_for(alice.tenant, name="one"), corpus_for(alice.tenant, name="two")
    upload(one, "otters.txt", OTTERS)
    run_jobs()
    for corpora in ([one], [one, two], [one]):
        rag_client.chat.completions.create(
            model=CHAT,
            messages=[{"role": "user", "content": "Why do otters hold hands?"}],
            extra_body={"rag": {"corpora": [c.public_id for c in corpora]}},
        )

    def counted() -> dict[str, int] | None:
        rows = dict(CorpusDay.objects.filter(day=today()).values_list("corpus__name", "searches"))
        return rows if rows == {"one": 3, "two": 1} else None

    assert wait_until(counted, timeout=10)
    row = CorpusDay.objects.get(corpus=one, day=today())  # ingestion and searches: one row
    assert (row.documents_ingested, row.failures) == (1, 0)


def test_counts_of_a_corpus_deleted_meanwhile_do_not_lose_the_others(rag_engine, alice):
    from apps.rag.usage import corpus_days_add

    kept, gone = corpus_for(alice.tenant, name="kept"), corpus_for(alice.tenant, name="gone")
    gone_pk = gone.pk
    gone.delete()
    day = today()
    corpus_days_add({(kept.pk, day): {"searches": 2}, (gone_pk, day): {"searches": 1}})
    corpus_days_add({(kept.pk, day): {"searches": 3, "failures": 1}})
    row = CorpusDay.objects.get()
    assert (row.corpus_id, row.searches, row.failures) == (kept.pk, 5, 1)
    kept.delete()
    assert not CorpusDay.objects.exists()  # a corpus's days go with it


def test_a_count_does_not_wait_for_a_corpus_row_held_by_ingestion(rag_engine, alice):
    """Ingestion stores a document's chunks with its corpus row locked (FOR UPDATE); a
    count then must not wait for it (as a foreign key check would)."""
    import psycopg
    from django.db import connection

    from apps.core.db import connection_kwargs
    from apps.rag.usage import ingestion_record, searches_record

    corpus = corpus_for(alice.tenant)
    with psycopg.connect(**connection_kwargs()) as other:
        other.execute("SELECT 1 FROM rag_corpus WHERE id = %s FOR UPDATE", [corpus.pk])
        with connection.cursor() as cursor:
            cursor.execute("SET lock_timeout = '1s'")
        try:
            searches_record(corpus_ids=[corpus.pk])
            ingestion_record(corpus_id=corpus.pk, failed=True)
        finally:
            with connection.cursor() as cursor:
                cursor.execute("RESET lock_timeout")
        other.rollback()
    row = CorpusDay.objects.get(corpus=corpus)
    assert (row.searches, row.failures) == (1, 1)


@pytest.mark.parametrize("days", [0, 366])
def test_the_admin_form_refuses_expiry_days_out_of_bounds(rag_engine, alice, days):
    from django.contrib import admin as django_admin

    corpus = corpus_for(alice.tenant, name="handbook")
    form_class = django_admin.site._registry[Corpus].form
    form = form_class(data={"expires_after_days": days}, instance=corpus)
    assert not form.is_valid()
    assert "from 1 to 365" in form.errors["expires_after_days"][0]


def test_the_admin_form_takes_expiry_days_in_bounds_or_none(rag_engine, alice):
    from django.contrib import admin as django_admin

    form_class = django_admin.site._registry[Corpus].form
    for days in (1, 365, ""):
        form = form_class(data={"expires_after_days": days}, instance=corpus_for(alice.tenant))
        form.is_valid()
        assert "expires_after_days" not in form.errors
