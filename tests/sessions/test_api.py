"""The tenant REST API under /api/: sessions and the default system prompt."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from apps.sessions.models import ChatSession, Message
from apps.sessions.services import (
    TurnMetrics,
    session_context_load,
    session_set_system_prompt,
    turn_record,
)
from apps.tenants.services import api_key_create, api_key_revoke

pytestmark = pytest.mark.django_db

T0 = timezone.now().replace(microsecond=0)
METRICS = TurnMetrics(
    prompt_tokens=30,
    cached_tokens=10,
    pp_tokens=20,
    pp_started_at=T0,
    pp_finished_at=T0 + timedelta(seconds=2),
    tg_tokens=5,
    tg_started_at=T0 + timedelta(seconds=2),
    tg_finished_at=T0 + timedelta(seconds=4),
)


def session_url(external_id: str) -> str:
    return f"/api/sessions/{external_id}"


def chat(tenant: Any, external_id: str, turns: int = 1) -> int:
    pk = session_context_load(
        tenant_id=tenant.pk, external_id=external_id, variant_system_prompt=""
    ).session_pk
    for i in range(turns):
        turn_record(
            session_pk=pk,
            new_messages=[{"role": "user", "content": f"q{i}"}],
            reply={"role": "assistant", "content": f"a{i}"},
            model="fake-model",
            metrics=METRICS,
            token_counts={0: 3},
        )
    return pk


def assert_error(response: Any, status: int, code: str | None = None, param: str | None = None):
    assert response.status_code == status, response.content
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    assert error["param"] == param
    return error


@pytest.fixture
def client() -> Client:
    return Client()


# --- authentication ------------------------------------------------------------------


ENDPOINTS = [
    ("get", "/api/sessions"),
    ("get", "/api/sessions/chat-1"),
    ("patch", "/api/sessions/chat-1"),
    ("delete", "/api/sessions/chat-1"),
    ("get", "/api/system-prompt"),
    ("put", "/api/system-prompt"),
]


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
def test_it_requires_an_api_key_everywhere(client, alice, method, path):
    response = getattr(client, method)(path)

    error = assert_error(response, 401, "invalid_api_key")
    assert "Authorization: Bearer" in error["message"]
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    "authorization",
    ["Bearer sk-nope", "Bearer sk-aaaaaaaaaaaa_wrong", "Basic dXNlcjpwYXNz", "Bearer"],
)
def test_it_rejects_bad_keys(client, alice, authorization):
    response = client.get("/api/sessions", headers={"Authorization": authorization})

    assert_error(response, 401, "invalid_api_key")


def test_it_rejects_a_right_prefix_with_a_wrong_secret(client, alice):
    forged = f"sk-{alice.api_key.prefix}_not-the-secret"

    response = client.get("/api/sessions", headers={"Authorization": f"Bearer {forged}"})

    assert_error(response, 401, "invalid_api_key")


def test_it_rejects_a_revoked_key(client, alice):
    api_key_revoke(api_key=alice.api_key)

    error = assert_error(client.get("/api/sessions", headers=alice.auth), 401, "invalid_api_key")
    assert "revoked" in error["message"]


def test_it_rejects_an_expired_key(client, alice):
    expired = api_key_create(
        tenant=alice.tenant, name="old", expires_at=timezone.now() - timedelta(seconds=1)
    )

    response = client.get("/api/sessions", headers={"Authorization": f"Bearer {expired.raw_key}"})

    assert "expired" in assert_error(response, 401, "invalid_api_key")["message"]


def test_it_forbids_an_inactive_tenant(client, alice):
    alice.tenant.active = False
    alice.tenant.save()

    error = assert_error(client.get("/api/sessions", headers=alice.auth), 403, "tenant_inactive")
    assert error["type"] == "permission_error"


def test_it_answers_unsupported_methods_in_openai_shape(client, alice):
    response = client.post("/api/sessions", headers=alice.auth)

    assert_error(response, 405, "method_not_allowed")


# --- GET /api/sessions ---------------------------------------------------------------


def test_it_lists_the_tenants_sessions_newest_activity_first(client, alice, bob):
    chat(alice.tenant, "older", turns=2)
    chat(alice.tenant, "newer", turns=1)
    chat(bob.tenant, "bobs")
    ChatSession.objects.filter(external_id="older").update(
        last_active_at=timezone.now() - timedelta(hours=1)
    )
    session_set_system_prompt(tenant_id=alice.tenant.pk, external_id="newer", system_prompt="hi")

    body = client.get("/api/sessions", headers=alice.auth).json()

    assert body["object"] == "list"
    assert body["has_more"] is False
    assert [(s["id"], s["message_count"]) for s in body["data"]] == [("newer", 2), ("older", 4)]
    assert set(body["data"][0]) == {
        "id",
        "system_prompt",
        "created_at",
        "last_active_at",
        "message_count",
    }
    assert body["data"][0]["system_prompt"] == "hi"


def test_it_paginates_with_limit_and_offset(client, alice):
    for i in range(5):
        chat(alice.tenant, f"s{i}", turns=0)
        ChatSession.objects.filter(external_id=f"s{i}").update(
            last_active_at=T0 + timedelta(minutes=i)
        )

    first = client.get("/api/sessions", {"limit": 2}, headers=alice.auth).json()
    last = client.get("/api/sessions", {"limit": 2, "offset": 4}, headers=alice.auth).json()

    assert [s["id"] for s in first["data"]] == ["s4", "s3"]
    assert (first["has_more"], first["limit"], first["offset"]) == (True, 2, 0)
    assert [s["id"] for s in last["data"]] == ["s0"]
    assert last["has_more"] is False


@pytest.mark.parametrize(
    ("query", "param"),
    [({"limit": 0}, "limit"), ({"limit": 101}, "limit"), ({"limit": "x"}, "limit"),
     ({"offset": -1}, "offset")],
)  # fmt: skip
def test_it_rejects_bad_pagination(client, alice, query, param):
    response = client.get("/api/sessions", query, headers=alice.auth)

    assert_error(response, 400, param=param)


def test_it_lists_in_a_constant_number_of_queries(client, alice, django_assert_max_num_queries):
    for i in range(15):
        chat(alice.tenant, f"s{i}", turns=2)

    # key lookup + one page query
    with django_assert_max_num_queries(2):
        response = client.get("/api/sessions", headers=alice.auth)

    assert len(response.json()["data"]) == 15


# --- GET /api/sessions/{id} ----------------------------------------------------------


def test_it_shows_a_session_with_its_messages_and_metrics(client, alice):
    chat(alice.tenant, "chat-1", turns=2)

    body = client.get(session_url("chat-1"), headers=alice.auth).json()

    assert (body["id"], body["message_count"]) == ("chat-1", 4)
    messages = body["messages"]
    assert [(m["position"], m["role"], m["content"]) for m in messages] == [
        (0, "user", "q0"),
        (1, "assistant", "a0"),
        (2, "user", "q1"),
        (3, "assistant", "a1"),
    ]
    question, answer = messages[0], messages[1]
    assert question["payload"] == {"role": "user", "content": "q0"}
    assert question["tokens"] == 3
    assert question["prompt_tokens"] is None
    assert question["pp_tokens_per_second"] is None
    assert answer["tokens"] == 5
    assert answer["model"] == "fake-model"
    assert (answer["prompt_tokens"], answer["cached_tokens"], answer["pp_tokens"]) == (30, 10, 20)
    assert answer["tg_tokens"] == 5
    assert answer["pp_started_at"]
    assert answer["tg_finished_at"]
    assert answer["pp_tokens_per_second"] == pytest.approx(10.0)
    assert answer["tg_tokens_per_second"] == pytest.approx(2.0)


def test_it_keeps_content_parts_and_tool_calls(client, alice):
    pk = chat(alice.tenant, "tools", turns=0)
    parts = [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "x"}},
    ]
    call = {"id": "c1", "type": "function", "function": {"name": "look", "arguments": "{}"}}
    turn_record(
        session_pk=pk,
        new_messages=[{"role": "user", "content": parts}],
        reply={"role": "assistant", "content": None, "tool_calls": [call]},
        model="m",
        metrics=METRICS,
    )

    messages = client.get(session_url("tools"), headers=alice.auth).json()["messages"]

    assert messages[0]["content"] == parts
    assert messages[1]["content"] is None
    assert messages[1]["payload"]["tool_calls"] == [call]


def test_it_shows_a_session_in_a_constant_number_of_queries(
    client, alice, django_assert_max_num_queries
):
    chat(alice.tenant, "long", turns=20)

    # key lookup + session + its messages
    with django_assert_max_num_queries(3):
        response = client.get(session_url("long"), headers=alice.auth)

    assert len(response.json()["messages"]) == 40


def test_it_answers_404_for_an_unknown_session(client, alice):
    error = assert_error(
        client.get(session_url("nope"), headers=alice.auth),
        404,
        "session_not_found",
        "session_id",
    )
    assert "nope" in error["message"]


@pytest.mark.parametrize("bad", ["has%20space", "a/b", "x" * 129, "semi;colon", "%0A"])
@pytest.mark.parametrize("method", ["get", "patch", "delete"])
def test_it_rejects_malformed_session_ids(client, alice, bad, method):
    response = getattr(client, method)(
        session_url(bad),
        {"system_prompt": "x"},
        content_type="application/json",
        headers=alice.auth,
    )

    error = assert_error(response, 400, "invalid_session_id", "session_id")
    assert "1-128 characters" in error["message"]


def test_it_accepts_ids_with_every_allowed_character(client, alice):
    chat(alice.tenant, "user@example.com:chat_1.v-2")

    response = client.get(session_url("user@example.com:chat_1.v-2"), headers=alice.auth)

    assert response.status_code == 200


# --- PATCH /api/sessions/{id} --------------------------------------------------------


def patch(client: Client, tenant: Any, external_id: str, body: Any):
    return client.patch(
        session_url(external_id), body, content_type="application/json", headers=tenant.auth
    )


def test_it_sets_a_sessions_system_prompt(client, alice):
    chat(alice.tenant, "chat-1")

    response = patch(client, alice, "chat-1", {"system_prompt": "  Talk like a pirate.\n"})

    assert response.status_code == 200
    assert response.json()["system_prompt"] == "  Talk like a pirate.\n"
    assert response.json()["message_count"] == 2
    assert ChatSession.objects.get(external_id="chat-1").system_prompt == "  Talk like a pirate.\n"


def test_it_creates_the_session_when_setting_its_prompt(client, alice):
    response = patch(client, alice, "fresh", {"system_prompt": "x"})

    assert response.status_code == 200
    assert response.json() | {"created_at": None, "last_active_at": None} == {
        "id": "fresh",
        "system_prompt": "x",
        "message_count": 0,
        "created_at": None,
        "last_active_at": None,
    }
    assert ChatSession.objects.get(external_id="fresh").tenant_id == alice.tenant.pk


def test_it_accepts_an_empty_prompt_and_the_maximum_length(client, alice):
    assert patch(client, alice, "a", {"system_prompt": ""}).status_code == 200
    assert patch(client, alice, "a", {"system_prompt": "x" * 100_000}).status_code == 200


@pytest.mark.parametrize(
    "body",
    [{}, {"system_prompt": None}, {"system_prompt": 42}, {"system_prompt": ["a"]},
     {"system_prompt": {"a": 1}}, {"system_prompt": True}, {"system_prompt": "x" * 100_001}],
)  # fmt: skip
def test_it_rejects_a_bad_system_prompt(client, alice, body):
    response = patch(client, alice, "chat-1", body)

    assert_error(response, 400, param="system_prompt")
    assert not ChatSession.objects.exists()


def test_it_rejects_a_body_that_is_not_a_json_object(client, alice):
    assert_error(patch(client, alice, "chat-1", ["system_prompt"]), 400)
    response = client.patch(
        session_url("chat-1"), "{nope", content_type="application/json", headers=alice.auth
    )
    assert_error(response, 400, "parse_error")
    response = client.patch(
        session_url("chat-1"), "system_prompt=x", content_type="text/plain", headers=alice.auth
    )
    assert_error(response, 415)


# --- DELETE /api/sessions/{id} -------------------------------------------------------


def test_it_deletes_a_session(client, alice):
    chat(alice.tenant, "chat-1")

    response = client.delete(session_url("chat-1"), headers=alice.auth)

    assert response.status_code == 204
    assert response.content == b""
    assert not ChatSession.objects.exists()
    assert not Message.objects.exists()


def test_it_answers_404_when_deleting_an_unknown_session(client, alice):
    response = client.delete(session_url("nope"), headers=alice.auth)

    assert_error(response, 404, "session_not_found", "session_id")


# --- tenant isolation ----------------------------------------------------------------


def test_it_never_shows_another_tenants_session(client, alice, bob):
    chat(alice.tenant, "alice-chat")

    listed = client.get("/api/sessions", headers=bob.auth).json()["data"]
    shown = client.get(session_url("alice-chat"), headers=bob.auth)
    unknown = client.get(session_url("never-existed"), headers=bob.auth)

    assert listed == []
    assert_error(shown, 404, "session_not_found", "session_id")
    # Same answer as for an id nobody uses: existence is not revealed.
    assert shown.json()["error"]["message"].replace("alice-chat", "ID") == unknown.json()["error"][
        "message"
    ].replace("never-existed", "ID")


def test_it_never_deletes_another_tenants_session(client, alice, bob):
    chat(alice.tenant, "alice-chat")

    response = client.delete(session_url("alice-chat"), headers=bob.auth)

    assert_error(response, 404, "session_not_found", "session_id")
    assert ChatSession.objects.get(external_id="alice-chat").tenant_id == alice.tenant.pk
    assert Message.objects.count() == 2


def test_it_never_edits_another_tenants_session(client, alice, bob):
    chat(alice.tenant, "shared")
    session_set_system_prompt(tenant_id=alice.tenant.pk, external_id="shared", system_prompt="A")

    response = patch(client, bob, "shared", {"system_prompt": "B"})

    # Bob gets a session of his own under the same id; Alice's is untouched.
    assert response.status_code == 200
    assert response.json()["message_count"] == 0
    prompts = dict(
        ChatSession.objects.filter(external_id="shared").values_list(
            "tenant__slug", "system_prompt"
        )
    )
    assert prompts == {"alice": "A", "bob": "B"}
    alice_view = client.get(session_url("shared"), headers=alice.auth).json()
    assert (alice_view["system_prompt"], alice_view["message_count"]) == ("A", 2)


# --- /api/system-prompt --------------------------------------------------------------


def test_it_reads_and_writes_the_tenants_default_system_prompt(client, alice, bob):
    assert client.get("/api/system-prompt", headers=alice.auth).json() == {"system_prompt": ""}

    response = client.put(
        "/api/system-prompt",
        {"system_prompt": "Be concise."},
        content_type="application/json",
        headers=alice.auth,
    )

    assert response.status_code == 200
    assert response.json() == {"system_prompt": "Be concise."}
    assert client.get("/api/system-prompt", headers=alice.auth).json() == {
        "system_prompt": "Be concise."
    }
    assert client.get("/api/system-prompt", headers=bob.auth).json() == {"system_prompt": ""}


@pytest.mark.parametrize("body", [{}, {"system_prompt": 1}, {"system_prompt": "x" * 100_001}])
def test_it_rejects_a_bad_default_system_prompt(client, alice, body):
    response = client.put(
        "/api/system-prompt", body, content_type="application/json", headers=alice.auth
    )

    assert_error(response, 400, param="system_prompt")
    alice.tenant.refresh_from_db()
    assert alice.tenant.system_prompt == ""


def test_it_reads_the_default_prompt_with_the_key_lookup_alone(
    client, alice, django_assert_max_num_queries
):
    with django_assert_max_num_queries(1):
        assert client.get("/api/system-prompt", headers=alice.auth).status_code == 200


# --- error shape ---------------------------------------------------------------------


def test_it_names_the_field_in_validation_messages(client, alice):
    error = assert_error(
        patch(client, alice, "a", {"system_prompt": 4}), 400, param="system_prompt"
    )

    assert error["message"] == "system_prompt: Not a valid string."


def test_it_turns_an_unexpected_failure_into_a_logged_openai_500(
    client, alice, monkeypatch, caplog
):
    def explode(**kwargs: Any) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr("apps.sessions.apis.session_list", explode)

    error = assert_error(client.get("/api/sessions", headers=alice.auth), 500)

    assert error["type"] == "api_error"
    assert "boom" not in error["message"]
    assert "boom" in caplog.text
