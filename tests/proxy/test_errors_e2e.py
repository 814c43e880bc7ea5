"""Every failure a client can meet on /v1, each OpenAI-shaped, through a real gateway."""

from __future__ import annotations

from datetime import timedelta

import httpx
import openai
import pytest
from django.utils import timezone

from apps.engines.models import Engine, EngineVariant, ServedModel
from apps.tenants.services import api_key_create, api_key_revoke
from tests.conftest import FAKE_MODEL, free_port, request_logs, start_gateway, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

CHAT = {"model": FAKE_MODEL, "messages": [{"role": "user", "content": "hi"}]}


def post_chat(gateway, headers: dict | None = None, **kwargs) -> httpx.Response:
    return httpx.post(
        f"{gateway.base_url}/chat/completions", headers=headers or {}, timeout=10, **kwargs
    )


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) >= {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


def test_it_rejects_a_missing_key(engine, gateway):
    response = post_chat(gateway, json=CHAT)
    assert response.status_code == 401
    assert error_of(response)["code"] == "invalid_api_key"


def test_it_rejects_an_unknown_or_malformed_key(engine, gateway, alice):
    for token in ("sk-nope", alice.raw_key[:-2] + "xx", "sk-" + "a" * 12 + "_secret"):
        response = post_chat(gateway, {"Authorization": f"Bearer {token}"}, json=CHAT)
        assert response.status_code == 401, token
        assert error_of(response)["code"] == "invalid_api_key"
    response = post_chat(gateway, {"Authorization": f"Basic {alice.raw_key}"}, json=CHAT)
    assert response.status_code == 401


def test_it_rejects_a_revoked_key_through_the_sdk(engine, gateway, alice):
    api_key_revoke(api_key=alice.api_key)
    client = openai.OpenAI(base_url=gateway.base_url, api_key=alice.raw_key, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        client.chat.completions.create(**CHAT)
    assert "revoked" in caught.value.message


def test_it_rejects_an_expired_key(engine, gateway, alice):
    created = api_key_create(
        tenant=alice.tenant, name="old", expires_at=timezone.now() - timedelta(seconds=1)
    )
    response = post_chat(gateway, {"Authorization": f"Bearer {created.raw_key}"}, json=CHAT)
    assert response.status_code == 401
    assert "expired" in error_of(response)["message"]


def test_it_forbids_an_inactive_tenant(engine, gateway, alice):
    alice.tenant.active = False
    alice.tenant.save()
    response = post_chat(gateway, alice.auth, json=CHAT)
    assert response.status_code == 403
    assert error_of(response)["type"] == "permission_error"


def test_it_answers_404_for_an_unknown_model(engine, openai_client):
    with pytest.raises(openai.NotFoundError) as caught:
        openai_client.chat.completions.create(model="no-such-model", messages=CHAT["messages"])
    assert caught.value.code == "model_not_found"


def test_it_answers_404_for_a_model_the_tenant_may_not_use(engine, gateway, alice):
    alice.tenant.allowed_models.set([ServedModel.objects.get(name="other-model")])
    response = post_chat(gateway, alice.auth, json=CHAT)
    assert response.status_code == 404
    assert error_of(response)["code"] == "model_not_found"
    allowed = post_chat(gateway, alice.auth, json={**CHAT, "model": "other-model"})
    assert allowed.status_code == 200


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (b"", None),
        (b'{"messages": [{"role": "user", "content": "x"}]}', "model"),
        (b'{"model": 5, "messages": [{"role": "user", "content": "x"}]}', "model"),
        (b'{"model": "fake-model", "messages": "hello"}', "messages"),
        (b'{"model": "fake-model", "messages": []}', "messages"),
        (b'{"model": "fake-model", "messages": [{"content": "x"}]}', "messages.[0].role"),
        (
            b'{"model": "fake-model", "messages": [{"role": "user", "content": 3}]}',
            "messages.[0].content",
        ),
        (
            b'{"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}',
            "stream",
        ),
        (
            b'{"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "max_tokens": "9"}',
            "max_tokens",
        ),
        (
            b'{"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}',
            "max_tokens",
        ),
        (
            b'{"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "temperature": true}',
            "temperature",
        ),
    ],
)
def test_it_rejects_malformed_chat_bodies(engine, gateway, alice, fake_engine, body, param):
    response = post_chat(gateway, {**alice.auth, "Content-Type": "application/json"}, content=body)
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert fake_engine.requests() == []  # nothing reached the engine


def test_it_rejects_malformed_completions_and_embeddings(engine, gateway, alice):
    bad_prompt = httpx.post(
        f"{gateway.base_url}/completions",
        headers=alice.auth,
        json={"model": FAKE_MODEL, "prompt": 7},
    )
    assert bad_prompt.status_code == 400
    assert error_of(bad_prompt)["param"] == "prompt"
    bad_input = httpx.post(
        f"{gateway.base_url}/embeddings",
        headers=alice.auth,
        json={"model": FAKE_MODEL, "input": {}},
    )
    assert bad_input.status_code == 400
    assert error_of(bad_input)["param"] == "input"


def test_it_answers_405_and_404_for_wrong_methods_and_paths(engine, gateway, alice):
    wrong_method = httpx.get(f"{gateway.base_url}/chat/completions", headers=alice.auth)
    assert wrong_method.status_code == 405
    assert error_of(wrong_method)["code"] == "method_not_allowed"
    unknown = httpx.post(f"{gateway.base_url}/nothing/here", headers=alice.auth, json={})
    assert unknown.status_code == 404
    assert error_of(unknown)["code"] == "unknown_url"


def _engine_serving(name: str, base_url: str, **fields) -> None:
    engine = Engine.objects.create(name=name, base_url=base_url, **fields)
    model = ServedModel.objects.create(name=f"{name}-model")
    EngineVariant.objects.create(engine=engine, model=model)


def test_it_answers_502_when_the_engine_is_unreachable(gateway, alice):
    _engine_serving("down", f"http://127.0.0.1:{free_port()}")
    response = post_chat(gateway, alice.auth, json={**CHAT, "model": "down-model"})
    assert response.status_code == 502
    assert error_of(response)["code"] == "engine_unreachable"
    log = wait_until(lambda: request_logs(tenant=alice.tenant))[0]
    assert (log.status_code, log.error_code, log.engine) == (502, "engine_unreachable", "down")


def test_it_answers_504_when_the_engine_is_too_slow(gateway, alice, fake_engine):
    _engine_serving("slow", fake_engine.url, timeout_seconds=0.5)
    body = {**CHAT, "model": "slow-model", "fake": {"delay": 3}}
    response = post_chat(gateway, alice.auth, json=body)
    assert response.status_code == 504
    assert error_of(response)["code"] == "engine_timeout"


def test_it_ends_a_stream_with_an_error_event_when_the_engine_stalls(gateway, alice, fake_engine):
    _engine_serving("stall", fake_engine.url, timeout_seconds=0.5)
    body = {**CHAT, "model": "stall-model", "stream": True, "fake": {"chunks": 3, "chunk_delay": 2}}
    with httpx.stream(
        "POST", f"{gateway.base_url}/chat/completions", headers=alice.auth, json=body
    ) as r:
        lines = [line for line in r.iter_lines() if line]
    assert '"engine_timeout"' in lines[-2]
    assert lines[-1] == "data: [DONE]"


def test_it_passes_engine_errors_through_with_their_status(engine, openai_client, gateway, alice):
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client.chat.completions.create(**CHAT, extra_body={"fake": {"error_status": 400}})
    assert caught.value.body["message"] == "fake error 400"
    response = post_chat(gateway, alice.auth, json={**CHAT, "fake": {"error_status": 503}})
    assert response.status_code == 503
    # llama.cpp's own fields are kept; the `param` it omits is added for OpenAI clients.
    assert error_of(response) == {
        "code": 503,
        "message": "fake error 503",
        "type": "server_error",
        "param": None,
    }
    log = wait_until(lambda: len(request_logs(tenant=alice.tenant)) == 2 and request_logs())
    assert [(entry.status_code, entry.error_code) for entry in log] == [
        (400, "engine_400"),
        (503, "engine_503"),
    ]
    # A refused request generated nothing: no tokens are charged for it.
    assert [(entry.prompt_tokens, entry.completion_tokens) for entry in log] == [(0, 0), (0, 0)]


def test_it_wraps_non_json_engine_errors_in_openai_shape(engine, gateway, alice):
    body = {**CHAT, "fake": {"error_status": 500, "error_text": "segfault in the kitchen"}}
    response = post_chat(gateway, alice.auth, json=body)
    assert response.status_code == 500
    error = error_of(response)
    assert error["message"] == "segfault in the kitchen"
    assert error["type"] == "api_error"


def test_it_passes_stream_errors_through_as_json(engine, gateway, alice):
    body = {**CHAT, "stream": True, "fake": {"error_status": 429}}
    response = post_chat(gateway, alice.auth, json=body)
    assert response.status_code == 429
    assert error_of(response)["message"] == "fake error 429"


def test_it_reports_an_engine_that_drops_the_stream(engine, gateway, alice):
    body = {**CHAT, "stream": True, "fake": {"chunks": 10, "drop_after": 3}}
    with httpx.stream(
        "POST", f"{gateway.base_url}/chat/completions", headers=alice.auth, json=body
    ) as r:
        lines = [line for line in r.iter_lines() if line]
    assert '"engine_stream_interrupted"' in lines[-2]
    assert lines[-1] == "data: [DONE]"
    log = wait_until(lambda: request_logs(tenant=alice.tenant))[0]
    assert (log.status_code, log.error_code) == (502, "engine_stream_interrupted")
    assert log.usage_estimated
    assert log.completion_tokens == 3


# --- every endpoint refuses bad keys; bodies, paths -------------------------------------

ENDPOINTS = [
    ("GET", "/models", None),
    ("GET", f"/models/{FAKE_MODEL}", None),
    ("POST", "/completions", {"model": FAKE_MODEL, "prompt": "hi"}),
    ("POST", "/embeddings", {"model": FAKE_MODEL, "input": "hi"}),
    ("POST", "/rerank", {"model": FAKE_MODEL, "query": "q", "documents": ["a", "b"]}),
    ("POST", "/chat/completions", CHAT),
]


@pytest.mark.parametrize(("method", "path", "body"), ENDPOINTS, ids=[e[1] for e in ENDPOINTS])
def test_it_refuses_bad_keys_and_inactive_tenants_on_every_endpoint(
    engine, gateway, alice, bob, fake_engine, method, path, body
):
    api_key_revoke(api_key=alice.api_key)
    bob.tenant.active = False
    bob.tenant.save()
    unknown = {"Authorization": "Bearer sk-" + "a" * 12 + "_no-such-secret"}
    cases = {
        "missing key": ({}, 401, "invalid_api_key"),
        "unknown key": (unknown, 401, "invalid_api_key"),
        "revoked key": (alice.auth, 401, "invalid_api_key"),
        "inactive tenant": (bob.auth, 403, "tenant_inactive"),
    }
    for case, (headers, status, code) in cases.items():
        response = httpx.request(
            method, gateway.base_url + path, headers=headers, json=body, timeout=10
        )
        assert (response.status_code, error_of(response)["code"]) == (status, code), case
    assert [r for r in fake_engine.requests() if r["path"] != "/health"] == []


def test_it_answers_413_for_a_body_over_max_request_bytes(engine, alice, fake_engine, tmp_path):
    from django.db import connection

    gateway = start_gateway(
        connection.settings_dict, tmp_path / "gateway.log", env={"MAX_REQUEST_BYTES": "2048"}
    )
    try:
        assert post_chat(gateway, alice.auth, json=CHAT).status_code == 200
        too_big = {**CHAT, "messages": [{"role": "user", "content": "x" * 4096}]}
        response = post_chat(gateway, alice.auth, json=too_big)
    finally:
        gateway.stop()
    assert response.status_code == 413
    error = error_of(response)
    assert (error["type"], error["code"]) == ("invalid_request_error", "request_too_large")
    assert "2048 bytes" in error["message"]
    chats = [r for r in fake_engine.requests() if r["path"] == "/v1/chat/completions"]
    assert len(chats) == 1  # only the small request reached the engine


@pytest.mark.parametrize(
    "path",
    ["/v1", "/v1/", "/v1/nothing", "/v1/nothing/", "/v1/chat/completions/", "/v1/models/"],
)
def test_it_answers_unknown_v1_paths_with_an_openai_404(gateway, alice, path):
    for method in ("GET", "POST"):
        response = httpx.request(method, gateway.url + path, headers=alice.auth, timeout=10)
        assert response.status_code == 404, method
        assert response.headers["content-type"] == "application/json"
        assert error_of(response)["code"] == "unknown_url"


# --- a failure after the response started ------------------------------------------------
