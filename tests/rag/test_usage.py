"""RAG's engine calls are the tenant's usage: a document's embeddings and a search's query
embedding are charged to the tenant's token quota with the tokens the engine reports,
logged as "embeddings (ingestion)" / "embeddings (retrieval)", and refused (a document
error, a 429) when the quota has no room."""

from __future__ import annotations

import pytest

from apps.quotas.selectors import quota_states
from apps.quotas.services import quota_set
from apps.request_logs.models import RequestLog
from tests.rag.conftest import corpus_for, run_jobs, upload

pytestmark = pytest.mark.django_db(transaction=True)

OTTERS = (
    "# Otters\n\nSea otters hold hands while they sleep.\n\n" + "They eat urchins and crabs. " * 40
)
INGESTION, RETRIEVAL = "embeddings (ingestion)", "embeddings (retrieval)"


def used(tenant) -> int:
    return sum(state.used for state in quota_states(tenant_id=tenant.pk))


def reserved(tenant) -> int:
    return sum(state.reserved for state in quota_states(tenant_id=tenant.pk))


def embedding_calls(fake_engine) -> list[dict]:
    return [r["body"] for r in fake_engine.requests() if r["path"] == "/v1/embeddings"]


def reported_tokens(body: dict) -> int:
    """What the fake engine reports as an embedding call's usage (a token per word)."""
    return sum(max(1, len(text.split())) for text in body["input"])


def test_ingestion_lowers_the_tenants_tokens_by_what_the_engine_reported(
    rag_engine, rag_fake_engine, alice, bob, settings
):
    settings.RAG_EMBED_BATCH = 4
    quota_set(tenant=alice.tenant, tokens=100_000, period="day")
    quota_set(tenant=bob.tenant, tokens=100_000, period="day")
    doc = upload(
        corpus_for(alice.tenant, chunk_tokens=32, chunk_overlap=0), "o.md", OTTERS.encode()
    )
    run_jobs()
    doc.refresh_from_db()
    assert doc.status == "ready", doc.error
    calls = embedding_calls(rag_fake_engine)
    assert len(calls) > 1
    charged = sum(reported_tokens(body) for body in calls)
    remaining = quota_states(tenant_id=alice.tenant.pk)[0].remaining
    assert (used(alice.tenant), reserved(alice.tenant), remaining) == (
        charged,
        0,
        100_000 - charged,
    )
    logs = list(RequestLog.objects.filter(endpoint=INGESTION))
    assert len(logs) == len(calls)
    assert {(log.tenant_id, log.api_key_id, log.status_code) for log in logs} == {
        (alice.tenant.pk, None, 200)
    }
    assert sum(log.prompt_tokens for log in logs) == charged
    assert not any(log.usage_estimated for log in logs)
    # Tenant isolation: Alice's ingestion never touches Bob's quota or usage.
    assert (used(bob.tenant), reserved(bob.tenant)) == (0, 0)
    assert not RequestLog.objects.filter(tenant=bob.tenant).exists()


def test_an_exhausted_quota_stops_ingestion_with_a_clear_error(rag_engine, rag_fake_engine, alice):
    quota_set(tenant=alice.tenant, tokens=5, period="day")
    doc = upload(corpus_for(alice.tenant), "o.md", OTTERS.encode())
    run_jobs()
    doc.refresh_from_db()
    assert doc.status == "failed"
    assert doc.error.startswith("Token quota exhausted: Token quota exceeded for tenant alice")
    assert doc.chunks.count() == 0
    assert embedding_calls(rag_fake_engine) == []  # the engine was not asked
    assert (used(alice.tenant), reserved(alice.tenant)) == (0, 0)
    (log,) = RequestLog.objects.filter(endpoint=INGESTION)
    assert (log.status_code, log.error_code, log.total_tokens) == (429, "insufficient_quota", 0)


def test_ingestion_stops_when_the_quota_runs_out_midway(
    rag_engine, rag_fake_engine, alice, settings
):
    settings.RAG_EMBED_BATCH = 1
    quota_set(tenant=alice.tenant, tokens=80, period="day")
    doc = upload(
        corpus_for(alice.tenant, chunk_tokens=32, chunk_overlap=0), "o.md", OTTERS.encode()
    )
    run_jobs()
    doc.refresh_from_db()
    calls = embedding_calls(rag_fake_engine)
    assert doc.status == "failed"
    assert "Token quota exhausted" in doc.error
    assert 1 <= len(calls) < doc.chunk_count
    # What the engine did is charged; nothing was held back, nothing spent past the limit.
    assert used(alice.tenant) == sum(reported_tokens(body) for body in calls) <= 80
    assert reserved(alice.tenant) == 0


def test_a_search_is_charged_to_the_callers_key_and_refused_without_tokens(
    rag_engine, rag_fake_engine, client, alice, bob
):
    corpus = corpus_for(alice.tenant)
    upload(corpus, "o.md", OTTERS.encode())
    run_jobs()
    quota_set(tenant=alice.tenant, tokens=1_000, period="day", api_key=alice.api_key)
    rag_fake_engine.reset()
    auth = {"HTTP_AUTHORIZATION": f"Bearer {alice.raw_key}"}
    query = {"query": "why do otters hold hands"}
    url = f"/api/corpora/{corpus.public_id}/search"
    found = client.post(url, query, content_type="application/json", **auth)
    assert found.status_code == 200, found.content
    (call,) = embedding_calls(rag_fake_engine)
    (log,) = RequestLog.objects.filter(endpoint=RETRIEVAL)
    assert (log.api_key_id, log.prompt_tokens) == (alice.api_key.pk, reported_tokens(call))
    assert used(alice.tenant) == reported_tokens(call)
    quota_set(
        tenant=alice.tenant, tokens=used(alice.tenant) + 1, period="day", api_key=alice.api_key
    )
    refused = client.post(url, query, content_type="application/json", **auth)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "insufficient_quota"
    assert len(embedding_calls(rag_fake_engine)) == 1  # the engine was not asked again
    # Bob cannot search Alice's corpus (and is charged nothing for trying).
    other = {"HTTP_AUTHORIZATION": f"Bearer {bob.raw_key}"}
    assert client.post(url, query, content_type="application/json", **other).status_code == 404
    assert not RequestLog.objects.filter(tenant=bob.tenant).exists()
