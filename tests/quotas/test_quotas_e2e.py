"""Token quotas through real gateway processes and the OpenAI SDK."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from apps.quotas.models import QuotaWindow
from apps.quotas.services import quota_set
from apps.tenants.services import api_key_create
from tests.conftest import FAKE_MODEL, start_gateway, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

# "hi": the gateway estimates 4 prompt tokens (chars / 4, role overhead), + max_tokens 5 = 9
# reserved; the fake engine then reports 1 prompt + 5 completion = 6 used.
CHAT = {"model": FAKE_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
RESERVED, USED = 9, 6


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
    quota_set(tenant=alice.tenant, tokens=RESERVED + 2, period="hour")
    client = openai.OpenAI(base_url=gateway.base_url, api_key=alice.raw_key, max_retries=0)
    client.chat.completions.create(**CHAT)
    wait_until(lambda: window(alice.tenant).reserved_tokens == 0)
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(**CHAT)
    error = caught.value.body
    assert (error["code"], error["type"]) == ("insufficient_quota", "insufficient_quota")
    assert "alice" in error["message"] and "hour" in error["message"]
    assert "resets at" in error["message"]
    assert int(caught.value.response.headers["retry-after"]) >= 1
    assert window(alice.tenant).used_tokens == USED  # the refused request cost nothing


def test_it_applies_key_and_tenant_quotas_together(engine, gateway, alice):
    other = api_key_create(tenant=alice.tenant, name="other")
    quota_set(tenant=alice.tenant, tokens=RESERVED, period="total", api_key=alice.api_key)
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

    limit = 150
    quota_set(tenant=alice.tenant, tokens=limit, period="day")
    gateways = [start_gateway(connection.settings_dict, tmp_path / f"gw{i}.log") for i in range(2)]

    async def burst() -> list[int]:
        async with httpx.AsyncClient(timeout=30) as client:
            requests = [
                client.post(
                    f"{gateways[i % 2].base_url}/chat/completions", json=CHAT, headers=alice.auth
                )
                for i in range(50)
            ]
            return [response.status_code for response in await asyncio.gather(*requests)]

    try:
        statuses = asyncio.run(burst())
    finally:
        for gateway in gateways:
            gateway.stop()
    wait_until(lambda: window(alice.tenant).reserved_tokens == 0)
    used = window(alice.tenant).used_tokens
    assert set(statuses) == {200, 429}
    assert used <= limit
    assert used == statuses.count(200) * USED
