"""With REDIS_URL the response cache is shared by every gateway process."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import FAKE_MODEL, start_gateway
from tests.tenants.test_rate_limits_e2e import redis_url  # noqa: F401 - fixture

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_hit_on_one_process_serves_another_through_redis(
    engine,
    alice,
    bob,
    fake_engine,
    redis_url,  # noqa: F811 - the fixture imported above
    tmp_path,
):
    from django.db import connection

    env = {"REDIS_URL": redis_url, "RESPONSE_CACHE_SECONDS": "60"}
    gateways = [
        start_gateway(connection.settings_dict, tmp_path / f"gw{i}.log", env=env) for i in range(2)
    ]
    try:
        clients = [
            openai.OpenAI(base_url=g.base_url, api_key=alice.raw_key, max_retries=0)
            for g in gateways
        ]
        body = {"model": FAKE_MODEL, "messages": [{"role": "user", "content": "hi"}], "seed": 1}
        first = clients[0].chat.completions.with_raw_response.create(**body)
        assert "x-gateway-cache" not in first.headers
        second = clients[1].chat.completions.with_raw_response.create(**body)
        assert second.headers["x-gateway-cache"] == "hit"
        calls = [r for r in fake_engine.requests() if r["path"] == "/v1/chat/completions"]
        assert len(calls) == 1
        stats = httpx.get(f"{gateways[0].url}/api/cache/stats", headers=alice.auth).json()
        assert (stats["store"], stats["entries"]) == ("redis", 1)
        assert stats["bytes"] > 0
        # Bob's lookup of the same request never reaches Alice's entry.
        other = openai.OpenAI(base_url=gateways[1].base_url, api_key=bob.raw_key, max_retries=0)
        assert (
            "x-gateway-cache" not in other.chat.completions.with_raw_response.create(**body).headers
        )
        theirs = httpx.get(f"{gateways[1].url}/api/cache/stats", headers=bob.auth).json()
        assert theirs["entries"] == 1
    finally:
        for gateway in gateways:
            gateway.stop()
