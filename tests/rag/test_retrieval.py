"""The same retrieval behaviour with both vector stores (pgvector HNSW and numpy)."""

from __future__ import annotations

import asyncio

import pytest

from apps.core.usage import Payer, usage_drain
from apps.engines.client import close_engine_session
from apps.rag.retrieval import corpus_refs, retrieve
from tests.rag.conftest import RERANK, corpus_for, run_jobs, upload

pytestmark = pytest.mark.django_db(transaction=True)

FACTS = {
    "otters.txt": "Sea otters hold hands while they sleep so they do not drift apart.",
    "beavers.txt": "Beavers build dams from branches and mud across streams.",
    "herons.txt": "Herons stand still in shallow water waiting to spear fish.",
    "bees.txt": "Honey bees dance to tell the hive where the flowers are.",
}


@pytest.fixture(params=["pgvector-exact", "pgvector-hnsw", "numpy"])
def store(request, settings):
    """pgvector searches small corpora exactly and large ones through the HNSW index."""
    if request.param == "pgvector-hnsw":
        settings.RAG_EXACT_SEARCH_MAX_CHUNKS = 0
    return request.param.split("-")[0]


def search(corpora, query, *, store, top_k=None):
    tenant = corpora[0].tenant
    payer = Payer(tenant_id=tenant.pk, tenant_slug=tenant.slug)

    async def run():
        try:
            return await retrieve(
                corpora=refs,
                query=query,
                top_k=top_k,
                payer=payer,
                store=store,
            )
        finally:
            await usage_drain()
            await close_engine_session()

    for c in corpora:
        c.refresh_from_db()
    refs = corpus_refs(corpora)
    return asyncio.run(run())


@pytest.fixture
def animals(rag_engine, alice):
    corpus = corpus_for(alice.tenant, name="animals")
    for name, text in FACTS.items():
        upload(corpus, name, text.encode())
    run_jobs()
    corpus.refresh_from_db()  # embedding_dims, set by the ingestion
    return corpus


def test_it_finds_the_chunk_that_answers(animals, store):
    hits = search([animals], "why do otters hold hands when they sleep", store=store, top_k=2)
    assert hits[0].document == "otters.txt"
    assert hits[0].text == FACTS["otters.txt"]
    assert hits[0].score > hits[1].score
    assert hits[0].document_id.startswith("file-")


def test_it_keeps_top_k_and_the_threshold(animals, store):
    assert len(search([animals], "beavers dams", store=store, top_k=3)) == 3
    animals.score_threshold = 0.3
    animals.save()
    hits = search([animals], "beavers dams", store=store, top_k=3)
    assert [h.document for h in hits] == ["beavers.txt"]


def test_full_text_alone_finds_exact_words(animals, store):
    animals.hybrid_weight = 0.0  # full-text ranking only
    animals.save()
    hits = search([animals], "spear", store=store, top_k=1)
    assert hits[0].document == "herons.txt"


def test_it_reranks_with_the_corpus_rerank_model(animals, rag_fake_engine, store):
    animals.rerank_model = RERANK
    animals.save()
    hits = search([animals], "bees dance flowers", store=store, top_k=2)
    assert hits[0].document == "bees.txt"
    assert hits[0].score == 1.0
    assert any(r["path"] == "/v1/rerank" for r in rag_fake_engine.requests())


def test_it_never_returns_chunks_of_other_corpora(animals, rag_engine, bob, store):
    other = corpus_for(bob.tenant, name="bob's")
    upload(other, "otters.txt", b"Otters hold hands: Bob's secret copy.")
    run_jobs()
    hits = search([animals], "otters hold hands", store=store, top_k=10)
    assert hits
    assert {h.corpus_id for h in hits} == {animals.public_id}


def test_a_document_being_ingested_is_invisible(animals, store):
    upload(animals, "late.txt", b"Sea otters hold hands late at night.")  # queued, not run
    hits = search([animals], "otters hold hands", store=store, top_k=10)
    assert "late.txt" not in {h.document for h in hits}


@pytest.fixture
def rivers(rag_engine, alice, settings):
    """Many chunks with a common word, one with it and a rare one, written last (the
    first chunks PostgreSQL comes across are the common word's), and the column's
    statistics up to date, as autovacuum keeps them."""
    from django.db import connection

    settings.RAG_TERM_STATS_SECONDS = 0  # this test's statistics, not an earlier test's
    corpus = corpus_for(alice.tenant, name="rivers", hybrid_weight=0.0)  # full text only
    for n in range(30):
        upload(corpus, f"river{n}.txt", f"The river number {n} flows to the sea.".encode())
    run_jobs()
    upload(corpus, "kelp.txt", b"Kelp forests grow where the river meets the sea.")
    run_jobs()
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE rag_chunk")
    corpus.refresh_from_db()
    return corpus


def test_full_text_ranks_the_rare_words_matches_beyond_the_cap(rivers, settings):
    # Fewer chunks ranked than match the common word: the rare word's are among them.
    settings.RAG_TEXT_MATCH_CAP = 5
    hits = search([rivers], "kelp river", store="pgvector", top_k=1)
    assert [h.document for h in hits] == ["kelp.txt"]


def test_full_text_of_stop_words_only_finds_nothing(rivers):
    hits = search([rivers], "the of where", store="pgvector", top_k=3)
    # The vector side still answers; the full-text side adds nothing and fails on nothing.
    assert len(hits) == 3
