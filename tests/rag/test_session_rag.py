"""RAG per session: `PUT/GET/DELETE /api/sessions/{id}/rag`, and chat completions of that
session retrieving from its corpora (over the key's and tenant's defaults, under the
request's own `rag` field)."""

from __future__ import annotations

import io

import pytest

from apps.rag.models import AutoRag, Corpus, SessionRag
from tests.rag.conftest import CHAT, EMBED, corpus_for

pytestmark = pytest.mark.django_db(transaction=True)

URL = "/api/sessions/chat-7/rag"
QUESTION = [{"role": "user", "content": "Why do otters hold hands?"}]


def auth(key) -> dict:
    return {"HTTP_AUTHORIZATION": f"Bearer {key.raw_key}"}


def put(client, key, body, url: str = URL):
    return client.put(url, body, content_type="application/json", **auth(key))


def test_it_sets_reads_replaces_and_removes_a_sessions_rag(rag_engine, client, alice):
    first, second = corpus_for(alice.tenant, name="a"), corpus_for(alice.tenant, name="b")

    resp = put(client, alice, {"corpora": [first.public_id], "top_k": 2})
    assert resp.status_code == 200, resp.content
    assert resp.json()["corpora"] == [first.public_id]
    assert resp.json()["top_k"] == 2
    put(client, alice, {"corpora": [second.public_id]})
    got = client.get(URL, **auth(alice)).json()
    assert got["corpora"] == [second.public_id]
    assert got["top_k"] is None
    assert got["enabled"] is True
    off = put(client, alice, {"enabled": False}).json()
    assert off["enabled"] is False
    assert off["corpora"] == []
    assert client.delete(URL, **auth(alice)).json()["deleted"] is True
    assert client.get(URL, **auth(alice)).status_code == 404
    assert not SessionRag.objects.exists()


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "corpora"),
        ({"corpora": "vs_x"}, "corpora"),
        ({"corpora": ["vs_unknown"]}, None),
        ({"corpora": [], "enabled": "no"}, "enabled"),
        ({"top_k": 0, "corpora": ["x"]}, "top_k"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_it_refuses_bad_settings_and_stores_nothing(rag_engine, client, alice, body, param):
    resp = put(client, alice, body)
    assert resp.status_code in (400, 404)
    assert resp.json()["error"]["param"] == param
    assert not SessionRag.objects.exists()


def test_one_tenant_cannot_see_set_or_remove_anothers(rag_engine, client, alice, bob):
    alices = corpus_for(alice.tenant)
    assert put(client, alice, {"corpora": [alices.public_id]}).status_code == 200

    assert client.get(URL, **auth(bob)).status_code == 404  # the same session id, Bob's
    assert client.delete(URL, **auth(bob)).status_code == 404
    assert put(client, bob, {"corpora": [alices.public_id]}).status_code == 404
    (setting,) = SessionRag.objects.all()
    assert setting.tenant == alice.tenant
    assert list(setting.corpora.all()) == [alices]


@pytest.fixture
def store(rag_engine, rag_client):
    store = rag_client.vector_stores.create(name="animals", extra_body={"embedding_model": EMBED})
    rag_client.vector_stores.files.upload_and_poll(
        vector_store_id=store.id,
        file=("otters.txt", io.BytesIO(b"Sea otters hold hands while they sleep.")),
        poll_interval_ms=100,
    )
    return store


def ask(rag_client, session: str | None = None, **extra_body):
    headers = {"X-Session-Id": session} if session else {}
    resp = rag_client.chat.completions.create(
        model=CHAT, messages=QUESTION, extra_headers=headers, extra_body=extra_body or None
    )
    return [s["document"] for s in (resp.model_extra or {}).get("sources", [])]


def test_a_sessions_chats_retrieve_from_its_corpora(store, rag_client, client, alice):
    assert put(client, alice, {"corpora": [store.id], "top_k": 1}).status_code == 200

    assert ask(rag_client, "chat-7") == ["otters.txt"]
    assert ask(rag_client, "another-chat") == []  # only that session
    assert ask(rag_client) == []
    assert ask(rag_client, "chat-7", rag=False) == []  # the request's own field wins


def test_a_session_turned_off_ignores_the_tenants_default(store, rag_client, client, alice):
    auto = AutoRag.objects.create(tenant=alice.tenant, top_k=1)
    auto.corpora.add(Corpus.objects.get(public_id=store.id))
    assert ask(rag_client, "chat-7") == ["otters.txt"]  # the tenant's default

    assert put(client, alice, {"enabled": False}).status_code == 200
    assert ask(rag_client, "chat-7") == []
    assert ask(rag_client, "chat-8") == ["otters.txt"]
