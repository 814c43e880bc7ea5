"""Input limits (LIMIT_*) and CORS (CORS_ALLOWED_ORIGINS) through a real gateway."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.conftest import FAKE_MODEL, GatewayProcess, request_logs, start_gateway

pytestmark = pytest.mark.django_db(transaction=True)

ORIGIN = "https://app.example.com"


@pytest.fixture(scope="module")
def limited(django_db_setup, django_db_blocker, tmp_path_factory) -> Iterator[GatewayProcess]:
    from django.db import connection

    env = {
        "LIMIT_MAX_MESSAGES": "3",
        "LIMIT_MAX_CONTENT_CHARS": "50",
        "LIMIT_MAX_N": "2",
        "LIMIT_MAX_TOOLS": "1",
        "CORS_ALLOWED_ORIGINS": f"{ORIGIN}, https://other.example.com",
    }
    log_path = tmp_path_factory.mktemp("limited") / "gateway.log"
    gateway = start_gateway(connection.settings_dict, log_path, env=env)
    yield gateway
    gateway.stop()


@pytest.fixture
def client(limited, alice, engine) -> openai.OpenAI:
    return openai.OpenAI(base_url=limited.base_url, api_key=alice.raw_key, max_retries=0)


def user(text: str = "hi") -> dict:
    return {"role": "user", "content": text}


def refused(call) -> dict:
    with pytest.raises(openai.BadRequestError) as caught:
        call()
    error = caught.value.body
    assert error["message"]
    return error


def test_it_refuses_too_many_messages(client, fake_engine):
    error = refused(lambda: client.chat.completions.create(model=FAKE_MODEL, messages=[user()] * 4))
    assert (error["code"], error["param"]) == ("request_too_large", "messages")
    assert "at most 3" in error["message"]
    assert not [r for r in fake_engine.requests() if r["path"] == "/v1/chat/completions"]
    client.chat.completions.create(model=FAKE_MODEL, messages=[user()] * 3)


def test_it_refuses_too_many_characters_of_content(client):
    parts = [{"type": "text", "text": "x" * 30}, {"type": "text", "text": "y" * 30}]
    error = refused(
        lambda: client.chat.completions.create(
            model=FAKE_MODEL, messages=[{"role": "user", "content": parts}]
        )
    )
    assert (error["code"], error["param"]) == ("request_too_large", "messages")
    error = refused(lambda: client.completions.create(model=FAKE_MODEL, prompt="z" * 51))
    assert error["param"] == "prompt"
    error = refused(lambda: client.embeddings.create(model=FAKE_MODEL, input=["a" * 26] * 2))
    assert error["param"] == "input"
    client.completions.create(model=FAKE_MODEL, prompt="z" * 50)


def test_it_refuses_n_above_the_bound(client):
    error = refused(
        lambda: client.chat.completions.create(model=FAKE_MODEL, messages=[user()], n=3)
    )
    assert error["param"] == "n"
    assert "at most 2" in error["message"]


def test_it_refuses_too_many_tools(client):
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    error = refused(
        lambda: client.chat.completions.create(
            model=FAKE_MODEL, messages=[user()], tools=[tool, tool]
        )
    )
    assert (error["code"], error["param"]) == ("request_too_large", "tools")


def test_it_refuses_max_tokens_above_the_models_context(client, alice):
    error = refused(
        lambda: client.chat.completions.create(model=FAKE_MODEL, messages=[user()], max_tokens=4097)
    )
    assert (error["code"], error["param"]) == ("context_length_exceeded", "max_tokens")
    assert "4096" in error["message"]
    client.chat.completions.create(model=FAKE_MODEL, messages=[user()], max_tokens=100)


def test_it_logs_a_refused_request(client, alice):
    refused(lambda: client.chat.completions.create(model=FAKE_MODEL, messages=[user()], n=9))
    from tests.conftest import wait_until

    log = wait_until(lambda: request_logs(tenant=alice.tenant))[0]
    assert (log.status_code, log.error_code) == (400, "invalid_request_error")


# --- CORS --------------------------------------------------------------------------------


def preflight(url: str, origin: str = ORIGIN) -> httpx.Response:
    return httpx.options(
        url,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )


def test_it_answers_a_preflight_on_v1_without_a_key(limited):
    response = preflight(f"{limited.base_url}/chat/completions")
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in response.headers["access-control-allow-methods"]
    assert "authorization" in response.headers["access-control-allow-headers"]


def test_it_answers_a_preflight_on_api_without_a_key(limited):
    response = preflight(f"{limited.url}/api/usage")
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == ORIGIN


def test_it_adds_cors_headers_to_v1_answers_for_allowed_origins_only(limited, alice, engine):
    headers = {**alice.auth, "Origin": "https://other.example.com"}
    body = {"model": FAKE_MODEL, "messages": [user()]}
    response = httpx.post(f"{limited.base_url}/chat/completions", json=body, headers=headers)
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "https://other.example.com"
    assert "x-gateway-model" in response.headers["access-control-expose-headers"]
    stranger = {**alice.auth, "Origin": "https://evil.example.com"}
    response = httpx.post(f"{limited.base_url}/chat/completions", json=body, headers=stranger)
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers
    assert (
        preflight(f"{limited.base_url}/models", "https://evil.example.com").headers.get(
            "access-control-allow-origin"
        )
        is None
    )


def test_it_adds_cors_headers_to_api_answers(limited, alice):
    response = httpx.get(f"{limited.url}/api/usage", headers={**alice.auth, "Origin": ORIGIN})
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == ORIGIN


def test_it_sends_no_cors_headers_when_no_origin_is_configured(gateway, alice, engine):
    response = preflight(f"{gateway.base_url}/chat/completions")
    assert "access-control-allow-origin" not in response.headers
    assert response.status_code != 200 or not response.headers.get("access-control-allow-methods")
    response = httpx.get(f"{gateway.base_url}/models", headers={**alice.auth, "Origin": ORIGIN})
    assert "access-control-allow-origin" not in response.headers
