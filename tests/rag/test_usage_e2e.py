"""The RAG stage's query embedding on a chat completion is the caller's usage: charged to
its key's and tenant's quotas, logged as "embeddings (retrieval)" next to the chat's own
row; a quota without room for it refuses the request (429) before the engine is asked."""

from __future__ import annotations

import io

import openai
import pytest

from apps.quotas.selectors import quota_states
from apps.quotas.services import quota_set
from tests.conftest import request_logs, wait_until
from tests.rag.conftest import CHAT, EMBED

pytestmark = pytest.mark.django_db(transaction=True)

QUESTION = [{"role": "user", "content": "Why do otters hold hands?"}]
RETRIEVAL = "embeddings (retrieval)"


@pytest.fixture
def store(rag_engine, rag_client):
    store = rag_client.vector_stores.create(name="animals", extra_body={"embedding_model": EMBED})
    rag_client.vector_stores.files.upload_and_poll(
        vector_store_id=store.id,
        file=("otters.txt", io.BytesIO(b"Sea otters hold hands while they sleep.")),
        poll_interval_ms=100,
    )
    return store


def used(tenant) -> int:
    return sum(state.used for state in quota_states(tenant_id=tenant.pk))


def test_the_query_embedding_is_charged_beside_the_chat(store, rag_client, rag_fake_engine, alice):
    quota_set(tenant=alice.tenant, tokens=100_000, period="day")
    charged_before = used(alice.tenant)  # the file's ingestion
    rag_fake_engine.reset()
    rag_client.chat.completions.create(
        model=CHAT, messages=QUESTION, extra_body={"rag": {"corpora": [store.id]}}
    )
    (embedding,) = wait_until(lambda: request_logs(tenant=alice.tenant, endpoint=RETRIEVAL))
    (chat,) = wait_until(lambda: request_logs(tenant=alice.tenant, endpoint="chat.completions"))
    (call,) = [r["body"] for r in rag_fake_engine.requests() if r["path"] == "/v1/embeddings"]
    assert embedding.prompt_tokens == len(call["input"][0].split())
    assert (embedding.api_key_id, embedding.model, embedding.status_code) == (
        alice.api_key.pk,
        EMBED,
        200,
    )
    wait_until(
        lambda: used(alice.tenant) - charged_before == embedding.total_tokens + chat.total_tokens
    )


def test_a_quota_without_room_for_the_query_refuses_before_the_engine(
    store, rag_client, rag_fake_engine, alice
):
    quota_set(tenant=alice.tenant, tokens=1, period="hour", api_key=alice.api_key)
    rag_fake_engine.reset()
    with pytest.raises(openai.RateLimitError) as refused:
        rag_client.chat.completions.create(
            model=CHAT, messages=QUESTION, extra_body={"rag": {"corpora": [store.id]}}
        )
    assert refused.value.body["code"] == "insufficient_quota"
    assert rag_fake_engine.requests() == []
    (log,) = wait_until(lambda: request_logs(tenant=alice.tenant, endpoint=RETRIEVAL))
    assert (log.status_code, log.error_code) == (429, "insufficient_quota")
