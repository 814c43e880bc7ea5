"""OpenAI's vector store expiry: `expires_after` on create and modify, `last_active_at`
pushed by use, `expires_at`, status "expired", searches refused, and the periodic task
that frees an expired store's chunks (the store stays)."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.utils import timezone
from procrastinate.contrib.django import app

from apps.rag.models import Chunk, Corpus, Document
from apps.rag.tasks import expire_vector_stores
from tests.rag.conftest import EMBED, run_jobs

pytestmark = pytest.mark.django_db(transaction=True)

DAY = 86400
WEEK = {"anchor": "last_active_at", "days": 7}
OTTERS = b"# Otters\n\nSea otters hold hands while they sleep so they do not drift apart.\n"


def auth(key) -> dict:
    return {"HTTP_AUTHORIZATION": f"Bearer {key.raw_key}"}


def post(client, key, path: str, body: Any):
    return client.post(f"/v1/{path}", body, content_type="application/json", **auth(key))


def create(client, key, **body) -> dict:
    resp = post(client, key, "vector_stores", {"name": "docs", "embedding_model": EMBED, **body})
    assert resp.status_code == 200, resp.content
    return resp.json()


def get(client, key, store_id: str) -> dict:
    resp = client.get(f"/v1/vector_stores/{store_id}", **auth(key))
    assert resp.status_code == 200, resp.content
    return resp.json()


def search(client, key, store_id: str):
    return post(client, key, f"vector_stores/{store_id}/search", {"query": "otters hold hands"})


def add_file(client, key, store_id: str, name: str = "otters.md", data: bytes = OTTERS):
    uploaded = client.post(
        "/v1/files",
        {"file": SimpleUploadedFile(name, data), "purpose": "assistants"},
        **auth(key),
    )
    assert uploaded.status_code == 200, uploaded.content
    return post(client, key, f"vector_stores/{store_id}/files", {"file_id": uploaded.json()["id"]})


def idle_since(store_id: str, ago: timedelta) -> None:
    """As if the store's last use was `ago` back."""
    Corpus.objects.filter(public_id=store_id).update(last_active_at=timezone.now() - ago)


def expire_now() -> int:
    return asyncio.run(expire_vector_stores(timestamp=0))


def test_it_creates_a_store_with_a_policy_and_shows_when_it_expires(rag_engine, client, alice):
    store = create(client, alice, expires_after=WEEK)
    assert store["expires_after"] == WEEK
    assert store["expires_at"] == store["last_active_at"] + 7 * DAY
    assert abs(store["last_active_at"] - timezone.now().timestamp()) < 5
    assert store["status"] == "completed"
    assert get(client, alice, store["id"]) == store
    listed = client.get("/v1/vector_stores", **auth(alice)).json()["data"]
    assert listed[0]["expires_at"] == store["expires_at"]
    forever = create(client, alice, name="forever")
    assert (forever["expires_after"], forever["expires_at"]) == (None, None)


def test_it_modifies_and_removes_the_policy(rag_engine, client, alice):
    store = create(client, alice, expires_after=WEEK)
    longer = post(
        client,
        alice,
        f"vector_stores/{store['id']}",
        {"expires_after": {"anchor": "last_active_at", "days": 30}},
    ).json()
    assert longer["expires_after"]["days"] == 30
    assert longer["expires_at"] == store["last_active_at"] + 30 * DAY
    renamed = post(client, alice, f"vector_stores/{store['id']}", {"name": "renamed"}).json()
    assert (renamed["name"], renamed["expires_after"]["days"]) == ("renamed", 30)
    removed = post(client, alice, f"vector_stores/{store['id']}", {"expires_after": None}).json()
    assert (removed["expires_after"], removed["expires_at"]) == (None, None)
    assert get(client, alice, store["id"])["expires_after"] is None


BAD_POLICIES = [
    ({"anchor": "created_at", "days": 7}, "expires_after.anchor"),
    ({"days": 7}, "expires_after.anchor"),
    ({"anchor": "last_active_at"}, "expires_after.days"),
    ({"anchor": "last_active_at", "days": 0}, "expires_after.days"),
    ({"anchor": "last_active_at", "days": 366}, "expires_after.days"),
    ({"anchor": "last_active_at", "days": "7"}, "expires_after.days"),
    ({"anchor": "last_active_at", "days": 1.5}, "expires_after.days"),
    ({"anchor": "last_active_at", "days": True}, "expires_after.days"),
    ({"anchor": "last_active_at", "days": 7, "hours": 1}, "expires_after.hours"),
    ("7 days", "expires_after"),
]


@pytest.mark.parametrize(("policy", "param"), BAD_POLICIES)
def test_it_refuses_a_bad_policy_on_create_and_creates_nothing(
    rag_engine, client, alice, policy, param
):
    resp = post(
        client,
        alice,
        "vector_stores",
        {"name": "x", "embedding_model": EMBED, "expires_after": policy},
    )
    assert resp.status_code == 400, resp.content
    assert resp.json()["error"]["type"] == "invalid_request_error"
    assert resp.json()["error"]["param"] == param
    assert not Corpus.objects.exists()


@pytest.mark.parametrize(("policy", "param"), BAD_POLICIES)
def test_it_refuses_a_bad_policy_on_modify_and_changes_nothing(
    rag_engine, client, alice, policy, param
):
    store = create(client, alice, expires_after=WEEK)
    resp = post(
        client, alice, f"vector_stores/{store['id']}", {"name": "renamed", "expires_after": policy}
    )
    assert resp.status_code == 400, resp.content
    assert resp.json()["error"]["param"] == param
    assert get(client, alice, store["id"]) == store


def test_an_expired_store_says_so_refuses_use_and_the_task_frees_its_chunks(
    rag_engine, client, alice
):
    store = create(client, alice, expires_after={"anchor": "last_active_at", "days": 1})
    kept = create(client, alice, name="kept", expires_after=WEEK)
    for target in (store, kept):
        assert add_file(client, alice, target["id"]).status_code == 200
    run_jobs()
    assert search(client, alice, store["id"]).json()["data"]
    idle_since(store["id"], timedelta(days=1, minutes=1))
    idle_since(kept["id"], timedelta(days=6))

    expired = get(client, alice, store["id"])
    assert expired["status"] == "expired"
    assert expired["expires_at"] < timezone.now().timestamp()
    assert get(client, alice, kept["id"])["status"] == "completed"
    refused = search(client, alice, store["id"])
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "vector_store_expired"
    assert store["id"] in refused.json()["error"]["message"]
    more = add_file(client, alice, store["id"], "bees.md", b"Honey bees dance.")
    assert more.json()["error"]["code"] == "vector_store_expired"
    revive = post(client, alice, f"vector_stores/{store['id']}", {"expires_after": WEEK})
    assert revive.json()["error"]["code"] == "vector_store_expired"

    assert expire_now() == 1
    assert not Chunk.objects.filter(corpus__public_id=store["id"]).exists()
    assert Chunk.objects.filter(corpus__public_id=kept["id"]).exists()
    after = get(client, alice, store["id"])
    assert after["status"] == "expired"
    assert after["file_counts"]["total"] == 1  # the store and its file list stay
    assert search(client, alice, store["id"]).status_code == 400
    assert expire_now() == 0  # once


def test_the_expiry_task_runs_every_minute():
    periodic = {key[0]: task for key, task in app.periodic_registry.periodic_tasks.items()}
    assert periodic["rag.expire_vector_stores"].cron == "* * * * *"


def test_use_pushes_expires_at_forward_at_most_once_a_minute(rag_engine, client, alice):
    store = create(client, alice, expires_after=WEEK)
    idle_since(store["id"], timedelta(days=3))
    old = get(client, alice, store["id"])
    assert search(client, alice, store["id"]).status_code == 200
    searched = get(client, alice, store["id"])
    assert searched["last_active_at"] > old["last_active_at"] + 2 * DAY
    assert searched["expires_at"] == searched["last_active_at"] + 7 * DAY

    idle_since(store["id"], timedelta(days=3))
    assert add_file(client, alice, store["id"]).status_code == 200
    assert get(client, alice, store["id"])["last_active_at"] >= searched["last_active_at"]

    idle_since(store["id"], timedelta(seconds=20))
    recent = get(client, alice, store["id"])
    search(client, alice, store["id"])
    assert get(client, alice, store["id"])["last_active_at"] == recent["last_active_at"]


def test_a_file_ingested_after_its_store_expired_adds_no_chunks(rag_engine, client, alice):
    store = create(client, alice, expires_after={"anchor": "last_active_at", "days": 1})
    add_file(client, alice, store["id"])
    idle_since(store["id"], timedelta(days=2))
    run_jobs()
    document = Document.objects.get()
    assert document.status == Document.Status.FAILED
    assert "expired" in document.error
    assert not Chunk.objects.exists()


def test_another_tenant_cannot_change_or_use_a_stores_policy(rag_engine, client, alice, bob):
    store = create(client, alice, expires_after=WEEK)
    for body in ({"expires_after": None}, {"expires_after": {**WEEK, "days": 1}}):
        resp = post(client, bob, f"vector_stores/{store['id']}", body)
        assert resp.status_code == 404, resp.content
    assert search(client, bob, store["id"]).status_code == 404
    assert get(client, alice, store["id"]) == store


def test_the_tenant_api_shows_and_enforces_expiry_too(rag_engine, client, alice):
    store = create(client, alice, expires_after=WEEK)
    idle_since(store["id"], timedelta(days=8))
    corpus = client.get(f"/api/corpora/{store['id']}", **auth(alice)).json()
    assert corpus["status"] == "expired"
    assert corpus["expires_at"] < timezone.now().timestamp()
    refused = client.post(
        f"/api/corpora/{store['id']}/search",
        {"query": "otters"},
        content_type="application/json",
        **auth(alice),
    )
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "vector_store_expired"
