"""Expiry on the native corpus API (`/api/corpora`) and the document pages: the same
`expires_after` as the vector stores (tests/rag/test_vector_store_expiry.py), the same
checks, and another tenant's corpus is out of reach."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from apps.rag.models import Corpus
from tests.rag.conftest import EMBED, corpus_for
from tests.rag.test_pages_browser import member
from tests.rag.test_vector_store_expiry import BAD_POLICIES, DAY, WEEK

pytestmark = pytest.mark.django_db(transaction=True)

PASSWORD = "a-long-test-password"


def auth(key) -> dict:
    return {"HTTP_AUTHORIZATION": f"Bearer {key.raw_key}"}


def create(client, key, **body: Any):
    return client.post(
        "/api/corpora",
        {"name": "docs", "embedding_model": EMBED, **body},
        content_type="application/json",
        **auth(key),
    )


def patch(client, key, corpus_id: str, body: Any):
    return client.patch(
        f"/api/corpora/{corpus_id}", body, content_type="application/json", **auth(key)
    )


def get(client, key, corpus_id: str) -> dict:
    resp = client.get(f"/api/corpora/{corpus_id}", **auth(key))
    assert resp.status_code == 200, resp.content
    return resp.json()


# --- the native API --------------------------------------------------------------------


def test_the_api_creates_a_corpus_with_a_policy_and_shows_when_it_expires(
    rag_engine, client, alice
):
    resp = create(client, alice, expires_after=WEEK)
    assert resp.status_code == 201, resp.content
    corpus = resp.json()
    assert corpus["expires_after"] == WEEK
    assert corpus["expires_at"] == corpus["last_active_at"] + 7 * DAY
    assert corpus["status"] == "active"
    assert get(client, alice, corpus["id"]) == corpus
    assert Corpus.objects.get(public_id=corpus["id"]).expires_after_days == 7
    forever = create(client, alice, name="forever").json()
    assert (forever["expires_after"], forever["expires_at"]) == (None, None)
    assert create(client, alice, name="null", expires_after=None).json()["expires_after"] is None


def test_the_api_sets_changes_and_clears_the_policy(rag_engine, client, alice):
    corpus = create(client, alice).json()
    week = patch(client, alice, corpus["id"], {"expires_after": WEEK}).json()
    assert week["expires_after"] == WEEK
    month = patch(
        client, alice, corpus["id"], {"expires_after": {"anchor": "last_active_at", "days": 30}}
    ).json()
    assert month["expires_at"] == month["last_active_at"] + 30 * DAY
    renamed = patch(client, alice, corpus["id"], {"name": "renamed"}).json()
    assert (renamed["name"], renamed["expires_after"]["days"]) == ("renamed", 30)  # kept
    cleared = patch(client, alice, corpus["id"], {"expires_after": None}).json()
    assert (cleared["expires_after"], cleared["expires_at"]) == (None, None)
    assert Corpus.objects.get(public_id=corpus["id"]).expires_after_days is None


@pytest.mark.parametrize(("policy", "param"), BAD_POLICIES)
def test_the_api_refuses_a_bad_policy_and_writes_nothing(rag_engine, client, alice, policy, param):
    refused = create(client, alice, expires_after=policy)
    assert refused.status_code == 400, refused.content
    error = refused.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert "`expires_after" in error["message"]
    assert not Corpus.objects.exists()
    corpus = create(client, alice, expires_after=WEEK).json()
    changed = patch(client, alice, corpus["id"], {"name": "renamed", "expires_after": policy})
    assert changed.status_code == 400, changed.content
    assert changed.json()["error"]["param"] == param
    assert get(client, alice, corpus["id"]) == corpus


def test_the_api_does_not_revive_an_expired_corpus(rag_engine, client, alice):
    corpus = create(client, alice, expires_after={"anchor": "last_active_at", "days": 1}).json()
    Corpus.objects.filter(public_id=corpus["id"]).update(
        last_active_at=timezone.now() - timedelta(days=2)
    )
    assert get(client, alice, corpus["id"])["status"] == "expired"
    for policy in (WEEK, None):
        resp = patch(client, alice, corpus["id"], {"expires_after": policy})
        assert resp.status_code == 400
        assert resp.json()["error"]["code"] == "vector_store_expired"
    assert Corpus.objects.get(public_id=corpus["id"]).expires_after_days == 1


def test_the_api_cannot_set_another_tenants_expiry(rag_engine, client, alice, bob):
    corpus = create(client, alice, expires_after=WEEK).json()
    for policy in (None, {"anchor": "last_active_at", "days": 1}):
        resp = patch(client, bob, corpus["id"], {"expires_after": policy})
        assert resp.status_code == 404
        assert resp.json()["error"]["code"] == "not_found"
    assert Corpus.objects.get(public_id=corpus["id"]).expires_after_days == 7
    assert [c["id"] for c in client.get("/api/corpora", **auth(bob)).json()["data"]] == []


# --- the pages -------------------------------------------------------------------------


@pytest.fixture
def people(rag_engine, alice, bob):
    member(alice.tenant, "ann", "editor")
    member(alice.tenant, "vic", "viewer")
    member(bob.tenant, "bert", "editor")
    return corpus_for(alice.tenant, name="Handbook")


def login(client, username: str):
    assert client.login(username=username, password=PASSWORD)
    return client


def days_of(corpus: Corpus) -> int | None:
    corpus.refresh_from_db()
    return corpus.expires_after_days


def test_an_editor_creates_a_corpus_that_expires(people, client, alice):
    login(client, "ann")
    resp = client.post(
        "/rag/corpora/new",
        {"tenant": alice.tenant.pk, "name": "Short-lived", "embedding_model": EMBED,
         "expires_after_days": "3"},
    )  # fmt: skip
    assert resp.status_code == 302
    created = Corpus.objects.get(name="Short-lived")
    assert created.expires_after_days == 3
    page = client.get(resp["Location"]).content.decode()
    assert f"{created.expires_at:%Y-%m-%d %H:%M} UTC (3 days after last use)" in page
    assert 'value="3"' in page
    listing = client.get("/rag/").content.decode()
    assert "(3 days after last use)" in listing
    never = client.post(
        "/rag/corpora/new",
        {"tenant": alice.tenant.pk, "name": "Forever", "embedding_model": EMBED,
         "expires_after_days": ""},
    )  # fmt: skip
    assert never.status_code == 302
    assert Corpus.objects.get(name="Forever").expires_after_days is None


@pytest.mark.parametrize("raw", ["0", "366", "-1", "1.5", "soon"])
def test_the_create_form_says_what_is_wrong_with_the_days(people, client, alice, raw):
    login(client, "ann")
    resp = client.post(
        "/rag/corpora/new",
        {"tenant": alice.tenant.pk, "name": "Bad", "embedding_model": EMBED,
         "expires_after_days": raw},
    )  # fmt: skip
    assert resp.status_code == 400
    assert "Expires after: a whole number of days from 1 to 365" in resp.content.decode()
    assert not Corpus.objects.filter(name="Bad").exists()


def test_an_editor_sets_changes_and_clears_the_expiry_on_the_corpus_page(people, client):
    corpus = people
    login(client, "ann")
    url = f"/rag/{corpus.public_id}/expiry"
    assert 'id="expiry-form"' in client.get(f"/rag/{corpus.public_id}/").content.decode()
    assert client.post(url, {"expires_after_days": "10"}).status_code == 302
    assert days_of(corpus) == 10
    bad = client.post(url, {"expires_after_days": "400"})
    assert bad.status_code == 400
    assert "Expires after: a whole number of days from 1 to 365" in bad.content.decode()
    assert days_of(corpus) == 10
    assert client.post(url, {"expires_after_days": ""}).status_code == 302
    assert days_of(corpus) is None
    page = client.get(f"/rag/{corpus.public_id}/").content.decode()
    assert '<span id="expires">never</span>' in page


def test_the_page_does_not_revive_an_expired_corpus(people, client):
    corpus = people
    Corpus.objects.filter(pk=corpus.pk).update(
        expires_after_days=1, last_active_at=timezone.now() - timedelta(days=2)
    )
    login(client, "ann")
    page = client.get(f"/rag/{corpus.public_id}/").content.decode()
    assert '<span id="expires">expired</span>' in page
    assert 'id="expiry-form"' not in page
    resp = client.post(f"/rag/{corpus.public_id}/expiry", {"expires_after_days": "30"})
    assert resp.status_code == 400
    assert f"Vector store {corpus.public_id} has expired" in resp.content.decode()
    assert days_of(corpus) == 1


def test_viewers_and_other_tenants_cannot_set_the_expiry(people, client):
    corpus = people
    url = f"/rag/{corpus.public_id}/expiry"
    assert client.post(url, {"expires_after_days": "1"}).status_code == 302  # to the login
    login(client, "vic")
    assert 'id="expiry-form"' not in client.get(f"/rag/{corpus.public_id}/").content.decode()
    assert client.post(url, {"expires_after_days": "1"}).status_code == 403
    client.logout()
    login(client, "bert")
    assert client.post(url, {"expires_after_days": "1"}).status_code == 404
    assert days_of(corpus) is None
