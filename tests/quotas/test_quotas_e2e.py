"""Token quotas through real gateway processes and the OpenAI SDK."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import openai
import pytest

from apps.engines.sizing import prompt_token_bound
from apps.quotas.models import QuotaWindow
from apps.quotas.services import quota_set
from apps.tenants.services import api_key_create
from tests.conftest import FAKE_MODEL, TenantKey, free_port, start_gateway, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

# "hi": the gateway reserves an upper bound of the prompt without asking the engine (its
# bytes plus the chat template's share: 82) + max_tokens 5 = 87; the fake engine then
# reports 1 prompt + 5 completion = 6 used.
CHAT = {"model": FAKE_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
RESERVED, USED = prompt_token_bound(CHAT, "chat.completions") + 5, 6
# When that bound does not fit, the engine counts: the fake renders "<|user|>\nhi\n
# <|assistant|>\n", 3 words, + BOS = 4 prompt tokens, + 5 = 9; less than that fits nothing.
COUNTED = 4 + 5


def window(tenant) -> QuotaWindow:
    return QuotaWindow.objects.get(quota__tenant=tenant)


def test_it_settles_to_the_actual_usage_and_reports_it_in_headers(engine, gateway, alice):
    quota_set(tenant=alice.tenant, tokens=1000, period="day")
    response = httpx.post(f"{gateway.base_url}/chat/completions", json=CHAT, headers=alice.auth)
    assert response.status_code == 200
    assert response.headers["x-ratelimit-limit-tokens"] == "1000"
    assert response.headers["x-ratelimit-remaining-tokens"] == str(1000 - RESERVED)
    assert response.headers["x-ratelimit-reset-tokens"]  # e.g. "5h3m"
    wait_until(lambda: window(alice.tenant).reserved_tokens == 0)
    assert window(alice.tenant).used_tokens == USED


def test_it_rejects_with_insufficient_quota_naming_the_quota_and_its_reset(engine, gateway, alice):
    quota_set(tenant=alice.tenant, tokens=USED + COUNTED - 1, period="hour")
    client = openai.OpenAI(base_url=gateway.base_url, api_key=alice.raw_key, max_retries=0)
    client.chat.completions.create(**CHAT)
    wait_until(lambda: window(alice.tenant).reserved_tokens == 0)
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(**CHAT)
    error = caught.value.body
    assert (error["code"], error["type"]) == ("insufficient_quota", "insufficient_quota")
    assert "alice" in error["message"]
    assert "hour" in error["message"]
    assert "resets at" in error["message"]
    assert int(caught.value.response.headers["retry-after"]) >= 1
    assert window(alice.tenant).used_tokens == USED  # the refused request cost nothing


def test_it_applies_key_and_tenant_quotas_together(engine, gateway, alice):
    other = api_key_create(tenant=alice.tenant, name="other")
    quota_set(tenant=alice.tenant, tokens=USED + COUNTED - 1, period="total", api_key=alice.api_key)
    quota_set(tenant=alice.tenant, tokens=1000, period="day")
    post = lambda key: httpx.post(  # noqa: E731
        f"{gateway.base_url}/chat/completions",
        json=CHAT,
        headers={"Authorization": f"Bearer {key}"},
    )
    assert post(alice.raw_key).status_code == 200
    assert post(alice.raw_key).status_code == 429  # its own total quota is spent
    assert post(other.raw_key).status_code == 200  # the tenant's day quota still has room


def test_it_settles_streams_and_disconnects_without_leaking_reservations(engine, gateway, alice):
    quota_set(tenant=alice.tenant, tokens=10_000, period="month")
    body = {**CHAT, "stream": True, "max_tokens": 300, "fake": {"chunks": 300, "chunk_delay": 0.02}}
    with httpx.stream(
        "POST", f"{gateway.base_url}/chat/completions", json=body, headers=alice.auth
    ) as r:
        for line in r.iter_lines():
            if '"w3 "' in line:
                break  # leave mid-stream
    wait_until(lambda: window(alice.tenant).reserved_tokens == 0, timeout=10)
    used = window(alice.tenant).used_tokens
    assert 1 + 4 <= used < 1 + 300  # the prompt and what was generated, not the reservation


def test_it_never_exceeds_a_quota_under_concurrency_across_gateway_processes(
    engine, alice, tmp_path
):
    from django.db import connection

    # Each request uses exactly what it reserved (1 prompt + 86 completion tokens = 87), so
    # settling frees nothing and how many fit does not depend on timing: 16 of them, and
    # what is left then is too little even for the engine's exact count. One more grant (a
    # reservation racing another) would show as 17 and 17 x 87 used.
    limit = 16 * RESERVED + COUNTED - 1
    exact = {**CHAT, "fake": {"chunks": RESERVED - 1}}
    fits = limit // RESERVED
    quota_set(tenant=alice.tenant, tokens=limit, period="day")
    gateways = [start_gateway(connection.settings_dict, tmp_path / f"gw{i}.log") for i in range(2)]

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as client:
            requests = [
                client.post(
                    f"{gateways[i % 2].base_url}/chat/completions", json=exact, headers=alice.auth
                )
                for i in range(50)
            ]
            return list(await asyncio.gather(*requests))

    try:
        responses = asyncio.run(burst())
    finally:
        for gateway in gateways:
            gateway.stop()
    wait_until(lambda: window(alice.tenant).reserved_tokens == 0)
    statuses = [response.status_code for response in responses]
    assert statuses.count(200) == fits
    assert statuses.count(429) == 50 - fits
    assert {r.json()["error"]["code"] for r in responses if r.status_code == 429} == {
        "insufficient_quota"
    }
    assert window(alice.tenant).used_tokens == fits * RESERVED
    # Each grant saw the grants before it: each remaining count exactly once.
    remaining = sorted(int(r.headers["x-ratelimit-remaining-tokens"]) for r in responses
                       if r.status_code == 200)  # fmt: skip
    assert remaining == [limit - RESERVED * n for n in range(fits, 0, -1)]


def assert_nothing_held_or_charged(owner: TenantKey) -> None:
    """The failed requests' reservations are given back and they cost nothing."""
    wait_until(lambda: window(owner.tenant).reserved_tokens == 0)
    assert window(owner.tenant).used_tokens == 0


def test_it_releases_the_reservation_of_a_request_the_engine_fails(engine, gateway, alice):
    quota_set(tenant=alice.tenant, tokens=1000, period="day")
    failing = {**CHAT, "fake": {"error_status": 500}}

    response = httpx.post(f"{gateway.base_url}/chat/completions", json=failing, headers=alice.auth)

    assert response.status_code == 500
    assert_nothing_held_or_charged(alice)
    after = httpx.post(f"{gateway.base_url}/chat/completions", json=CHAT, headers=alice.auth)
    assert after.headers["x-ratelimit-remaining-tokens"] == str(1000 - RESERVED)


def test_it_releases_the_reservation_when_the_engine_is_unreachable(gateway, alice):
    from apps.engines.services import engine_register_external

    # Nothing listens on a port just freed: the connection is refused.
    engine_register_external(
        name="ghost", base_url=f"http://127.0.0.1:{free_port()}", models=["ghost-model"]
    )
    quota_set(tenant=alice.tenant, tokens=1000, period="day")
    body = {**CHAT, "model": "ghost-model"}

    first = httpx.post(f"{gateway.base_url}/chat/completions", json=body, headers=alice.auth)
    second = httpx.post(f"{gateway.base_url}/chat/completions", json=body, headers=alice.auth)

    assert first.status_code == second.status_code == 502
    assert first.json()["error"]["code"] == "engine_unreachable"
    assert_nothing_held_or_charged(alice)


def test_it_settles_a_completed_stream_to_its_usage_and_sends_the_headers(engine, gateway, alice):
    quota_set(tenant=alice.tenant, tokens=1000, period="day")
    client = openai.OpenAI(base_url=gateway.base_url, api_key=alice.raw_key, max_retries=0)

    with client.chat.completions.with_streaming_response.create(
        **CHAT, stream=True, extra_body={"fake": {"chunks": 3}}
    ) as response:
        headers = response.headers
        text = "".join(c.choices[0].delta.content or "" for c in response.parse() if c.choices)

    assert text == "w0 w1 w2 "
    assert headers["x-ratelimit-limit-tokens"] == "1000"
    assert headers["x-ratelimit-remaining-tokens"] == str(1000 - RESERVED)
    assert re.fullmatch(r"\d+h\d+m|\d+m\d+s|\d+s", headers["x-ratelimit-reset-tokens"])
    wait_until(lambda: window(alice.tenant).reserved_tokens == 0)
    assert window(alice.tenant).used_tokens == 1 + 3  # the engine's usage, not what was reserved


def test_it_applies_a_new_quota_within_the_auth_cache_time(engine, alice, tmp_path):
    from django.db import connection

    gateway = start_gateway(
        connection.settings_dict, tmp_path / "gw.log", env={"AUTH_CACHE_SECONDS": "1"}
    )

    def post() -> int:
        url = f"{gateway.base_url}/chat/completions"
        return httpx.post(url, json=CHAT, headers=alice.auth).status_code

    try:
        assert post() == 200  # the key, without quotas, is now cached for a second
        quota_set(tenant=alice.tenant, tokens=COUNTED - 1, period="day")  # fits nothing
        started = time.monotonic()
        wait_until(lambda: post() == 429, timeout=5, interval=0.1)
        elapsed = time.monotonic() - started
    finally:
        gateway.stop()
    assert elapsed < 1 + 1  # AUTH_CACHE_SECONDS, plus a request's time


def test_it_asks_the_engine_to_count_when_the_bound_does_not_fit(engine, gateway, alice):
    """50 words of 10 letters: 550 bytes could be 550 tokens, more than the 200 left; the
    engine counts 53 (the fake's template adds 2 words, + BOS), which fit. 300 do not."""
    quota_set(tenant=alice.tenant, tokens=200, period="day")
    long = {**CHAT, "messages": [{"role": "user", "content": " ".join(["abcdefghij"] * 50)}]}
    too_long = {**CHAT, "messages": [{"role": "user", "content": " ".join(["abcdefghij"] * 300)}]}
    url = f"{gateway.base_url}/chat/completions"

    fits = httpx.post(url, json=long, headers=alice.auth)
    refused = httpx.post(url, json=too_long, headers=alice.auth)

    assert fits.status_code == 200
    assert fits.headers["x-ratelimit-remaining-tokens"] == str(200 - (50 + 3 + 5))
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "insufficient_quota"
