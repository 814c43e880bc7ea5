"""Automatic RAG on chat completions through the official SDK against a real serve."""

from __future__ import annotations

import io
from datetime import timedelta

import httpx
import openai
import pytest
from django.utils import timezone

from apps.rag.models import AutoRag, Corpus
from tests.conftest import wait_until
from tests.rag.conftest import CHAT, EMBED

pytestmark = pytest.mark.django_db(transaction=True)

OTTERS = b"Sea otters hold hands while they sleep so they do not drift apart."
BEES = b"Honey bees dance to tell the hive where the flowers are."
QUESTION = [{"role": "user", "content": "Why do otters hold hands?"}]


@pytest.fixture
def store(rag_engine, rag_client):
    store = rag_client.vector_stores.create(name="animals", extra_body={"embedding_model": EMBED})
    for name, data in (("otters.txt", OTTERS), ("bees.txt", BEES)):
        rag_client.vector_stores.files.upload_and_poll(
            vector_store_id=store.id, file=(name, io.BytesIO(data)), poll_interval_ms=100
        )
    return store


def chat_bodies(engine) -> list[dict]:
    return [r["body"] for r in engine.requests() if r["path"] == "/v1/chat/completions"]


def test_it_injects_numbered_sources_and_returns_them(store, rag_client, rag_fake_engine):
    rag_fake_engine.reset()
    resp = rag_client.chat.completions.create(
        model=CHAT, messages=QUESTION, extra_body={"rag": {"corpora": [store.id], "top_k": 1}}
    )
    (source,) = resp.model_extra["sources"]
    assert source["id"] == 1
    assert source["document"] == "otters.txt"
    assert source["text"] == OTTERS.decode()
    assert source["document_id"].startswith("file-")
    assert source["page"] is None
    assert source["score"] > 0
    (body,) = chat_bodies(rag_fake_engine)
    assert "rag" not in body
    system, user = body["messages"]
    assert system["role"] == "system"
    assert "[1] (otters.txt)" in system["content"]
    assert "cite" in system["content"]
    assert OTTERS.decode() in system["content"]
    assert user == QUESTION[0]


def test_a_stream_ends_with_one_sources_chunk(store, rag_client):
    chunks = list(
        rag_client.chat.completions.create(
            model=CHAT,
            messages=QUESTION,
            stream=True,
            extra_body={"rag": {"corpora": [store.id], "top_k": 2}},
        )
    )
    with_sources = [c for c in chunks if (c.model_extra or {}).get("sources")]
    assert with_sources == [chunks[-1]]
    assert chunks[-1].choices == []
    assert [s["id"] for s in chunks[-1].model_extra["sources"]] == [1, 2]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)  # the answer


def test_the_injected_tokens_are_counted(store, rag_client):
    plain = rag_client.chat.completions.create(model=CHAT, messages=QUESTION)
    with_rag = rag_client.chat.completions.create(
        model=CHAT, messages=QUESTION, extra_body={"rag": {"corpora": [store.id]}}
    )
    assert with_rag.usage.prompt_tokens > plain.usage.prompt_tokens + 10


def test_tenant_and_key_defaults_apply_and_rag_false_turns_them_off(
    store, rag_client, alice, rag_fake_engine
):
    auto = AutoRag.objects.create(tenant=alice.tenant, top_k=1)
    auto.corpora.add(Corpus.objects.get(public_id=store.id))
    resp = rag_client.chat.completions.create(model=CHAT, messages=QUESTION)
    assert resp.model_extra["sources"][0]["document"] == "otters.txt"
    off = rag_client.chat.completions.create(
        model=CHAT, messages=QUESTION, extra_body={"rag": False}
    )
    assert "sources" not in (off.model_extra or {})
    key_off = AutoRag.objects.create(tenant=alice.tenant, api_key=alice.api_key, enabled=False)
    assert key_off.pk
    assert "sources" not in (
        rag_client.chat.completions.create(model=CHAT, messages=QUESTION).model_extra or {}
    )


def test_sources_are_stored_on_the_session_reply_not_in_its_history(
    store, rag_client, rag_fake_engine
):
    from apps.sessions.models import Message

    headers = {"X-Session-Id": "rag-session-1"}
    rag = {"rag": {"corpora": [store.id], "top_k": 1}}
    rag_client.chat.completions.create(
        model=CHAT, messages=QUESTION, extra_headers=headers, extra_body=rag
    )
    reply = wait_until(lambda: Message.objects.filter(role="assistant").first())
    assert reply.payload["sources"][0]["document"] == "otters.txt"
    user = Message.objects.get(role="user")
    assert user.payload == QUESTION[0]  # the question as asked, without the sources
    rag_fake_engine.reset()
    rag_client.chat.completions.create(
        model=CHAT,
        messages=[{"role": "user", "content": "And bees?"}],
        extra_headers=headers,
        extra_body=rag,
    )
    (body,) = chat_bodies(rag_fake_engine)
    systems = [m for m in body["messages"] if m["role"] == "system"]
    assert len(systems) == 1
    assert "bees.txt" in systems[0]["content"]


def test_another_tenants_corpus_is_a_404(store, rag_gateway, bob):
    other = openai.OpenAI(base_url=rag_gateway.base_url, api_key=bob.raw_key, max_retries=0)
    with pytest.raises(openai.NotFoundError, match=store.id):
        other.chat.completions.create(
            model=CHAT, messages=QUESTION, extra_body={"rag": {"corpora": [store.id]}}
        )


@pytest.mark.parametrize(
    ("rag", "param"),
    [
        ("yes", "rag"),
        ({"corpora": []}, "rag.corpora"),
        ({"corpora": ["vs_x"], "top_k": 0}, "rag.top_k"),
    ],
)
def test_it_refuses_a_malformed_rag_field(rag_engine, rag_gateway, alice, rag, param):
    resp = httpx.post(
        f"{rag_gateway.base_url}/chat/completions",
        headers=alice.auth,
        json={"model": CHAT, "messages": QUESTION, "rag": rag},
    )
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == param


def expire_soon(rag_client, store, *, idle: timedelta) -> None:
    """A one-day policy (set through the SDK), as if the store's last use was `idle` ago."""
    updated = rag_client.vector_stores.update(
        store.id, expires_after={"anchor": "last_active_at", "days": 1}
    )
    assert updated.expires_at == updated.last_active_at + 86400
    Corpus.objects.filter(public_id=store.id).update(last_active_at=timezone.now() - idle)


def test_an_expired_store_asked_for_by_id_is_refused(store, rag_gateway, rag_client, alice):
    expire_soon(rag_client, store, idle=timedelta(days=2))
    resp = httpx.post(
        f"{rag_gateway.base_url}/chat/completions",
        headers=alice.auth,
        json={"model": CHAT, "messages": QUESTION, "rag": {"corpora": [store.id]}},
    )
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "vector_store_expired"
    assert resp.json()["error"]["param"] == "rag.corpora"


def test_an_expired_default_store_is_left_out(store, rag_client, alice):
    expire_soon(rag_client, store, idle=timedelta(days=2))
    auto = AutoRag.objects.create(tenant=alice.tenant)
    auto.corpora.add(Corpus.objects.get(public_id=store.id))
    resp = rag_client.chat.completions.create(model=CHAT, messages=QUESTION)
    assert resp.choices[0].message.content
    assert "sources" not in (resp.model_extra or {})


def test_a_chat_retrieving_from_a_store_pushes_its_expiry(store, rag_client):
    expire_soon(rag_client, store, idle=timedelta(hours=20))
    resp = rag_client.chat.completions.create(
        model=CHAT, messages=QUESTION, extra_body={"rag": {"corpora": [store.id]}}
    )
    assert resp.model_extra["sources"]
    retrieved = rag_client.vector_stores.retrieve(store.id)
    assert abs(retrieved.last_active_at - timezone.now().timestamp()) < 30
    assert retrieved.expires_at == retrieved.last_active_at + 86400
