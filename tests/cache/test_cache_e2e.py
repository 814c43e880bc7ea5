"""The response cache through a real gateway (RESPONSE_CACHE_SECONDS on, local memory)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from apps.cache.models import CachePolicy
from apps.engines.models import ServedModel
from apps.quotas.models import Period
from apps.quotas.services import quota_set
from tests.conftest import FAKE_MODEL, GatewayProcess, request_logs, start_gateway, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

HI = [{"role": "user", "content": "hello cache"}]


@pytest.fixture(scope="module")
def cached(django_db_setup, django_db_blocker, tmp_path_factory) -> Iterator[GatewayProcess]:
    from django.db import connection

    env = {"RESPONSE_CACHE_SECONDS": "60", "QUOTA_LEASES": "0"}
    log_path = tmp_path_factory.mktemp("cached") / "gateway.log"
    gateway = start_gateway(connection.settings_dict, log_path, env=env)
    yield gateway
    gateway.stop()


def client_for(gateway: GatewayProcess, key) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key=key.raw_key, max_retries=0)


def engine_calls(fake_engine) -> int:
    return len([r for r in fake_engine.requests() if r["path"].startswith("/v1/")])


def ask(client: openai.OpenAI, **options):
    return client.chat.completions.with_raw_response.create(
        model=FAKE_MODEL, messages=HI, temperature=0, **options
    )


def test_it_answers_a_repeated_deterministic_request_from_the_cache(
    cached, alice, engine, fake_engine
):
    client = client_for(cached, alice)
    first = ask(client)
    assert "x-gateway-cache" not in first.headers
    second = ask(client)
    assert second.headers["x-gateway-cache"] == "hit"
    assert second.parse().choices[0].message.content == first.parse().choices[0].message.content
    assert engine_calls(fake_engine) == 1
    logs = wait_until(lambda: len(request_logs(tenant=alice.tenant)) == 2 and request_logs())
    assert [(log.cache_status, log.status_code) for log in logs] == [("miss", 200), ("hit", 200)]
    # A hit spends nothing; it saved what the first answer cost.
    assert (logs[1].prompt_tokens, logs[1].completion_tokens, logs[1].engine) == (0, 0, "")
    assert logs[1].cache_saved_tokens == logs[0].prompt_tokens + logs[0].completion_tokens
    metrics = httpx.get(f"{cached.url}/metrics").text
    assert 'gateway_cache_lookups_total{result="hit"} 1.0' in metrics
    assert 'gateway_cache_lookups_total{result="miss"} 1.0' in metrics


def test_it_replays_a_hit_as_a_stream_and_caches_streamed_answers(
    cached, alice, engine, fake_engine
):
    client = client_for(cached, alice)
    whole = ask(client).parse().choices[0].message.content
    with client.chat.completions.with_streaming_response.create(
        model=FAKE_MODEL, messages=HI, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ) as response:  # fmt: skip
        assert response.headers["x-gateway-cache"] == "hit"
        chunks = list(response.parse())
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert chunks[-1].usage.completion_tokens == 5
    assert engine_calls(fake_engine) == 1
    # A streamed miss is stored too, and served whole next time.
    streamed = client.chat.completions.create(model=FAKE_MODEL, messages=HI, seed=7, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    hit = client.chat.completions.with_raw_response.create(model=FAKE_MODEL, messages=HI, seed=7)
    assert hit.headers["x-gateway-cache"] == "hit"
    assert hit.parse().choices[0].message.content == text
    assert engine_calls(fake_engine) == 2


def test_it_caches_only_deterministic_or_opted_in_requests(cached, alice, engine, fake_engine):
    client = client_for(cached, alice)
    for _ in range(2):
        client.chat.completions.create(model=FAKE_MODEL, messages=HI, temperature=0.7)
    assert engine_calls(fake_engine) == 2
    for _ in range(2):
        raw = client.chat.completions.with_raw_response.create(
            model=FAKE_MODEL, messages=HI, extra_headers={"X-Gateway-Cache": "on"}
        )
    assert raw.headers["x-gateway-cache"] == "hit"
    assert engine_calls(fake_engine) == 3


def test_it_never_shares_answers_across_tenants(cached, alice, bob, engine, fake_engine):
    ask(client_for(cached, alice))
    other = ask(client_for(cached, bob))
    assert "x-gateway-cache" not in other.headers
    assert engine_calls(fake_engine) == 2


def test_no_cache_bypasses_the_lookup(cached, alice, engine, fake_engine):
    client = client_for(cached, alice)
    ask(client)
    fresh = ask(client, extra_headers={"Cache-Control": "no-cache"})
    assert "x-gateway-cache" not in fresh.headers
    assert engine_calls(fake_engine) == 2


def test_different_requests_or_models_miss(cached, alice, engine, fake_engine):
    client = client_for(cached, alice)
    ask(client)
    ask(client, max_tokens=7)
    client.chat.completions.create(model="other-model", messages=HI, temperature=0)
    assert engine_calls(fake_engine) == 3


def test_a_hit_does_not_spend_the_quota(cached, alice, engine, fake_engine):
    client = client_for(cached, alice)
    ask(client, max_tokens=5)
    log = wait_until(lambda: request_logs(tenant=alice.tenant))[0]
    # The quota is now spent: a new request is refused, the cached one still served.
    quota_set(
        tenant=alice.tenant, tokens=log.prompt_tokens + log.completion_tokens, period=Period.DAY
    )
    with pytest.raises(openai.RateLimitError):
        ask(client, max_tokens=6)
    assert ask(client, max_tokens=5).headers["x-gateway-cache"] == "hit"


def test_embeddings_are_cached(cached, alice, engine, fake_engine):
    client = client_for(cached, alice)
    first = client.embeddings.create(model=FAKE_MODEL, input="vector me")
    raw = client.embeddings.with_raw_response.create(model=FAKE_MODEL, input="vector me")
    assert raw.headers["x-gateway-cache"] == "hit"
    assert raw.parse().data[0].embedding == first.data[0].embedding
    assert engine_calls(fake_engine) == 1


def test_stats_api_shows_only_the_callers_figures(cached, alice, bob, engine):
    client = client_for(cached, alice)
    for _ in range(3):
        ask(client)
    wait_until(lambda: len(request_logs(tenant=alice.tenant)) == 3)
    stats = httpx.get(f"{cached.url}/api/cache/stats", headers=alice.auth).json()
    assert (stats["hits"], stats["misses"], stats["store"]) == (2, 1, "memory")
    assert stats["saved_tokens"] > 0
    assert stats["entries"] == 1
    assert stats["bytes"] > 0
    assert stats["hit_rate"] == pytest.approx(2 / 3)
    theirs = httpx.get(f"{cached.url}/api/cache/stats", headers=bob.auth).json()
    assert (theirs["hits"], theirs["misses"], theirs["entries"]) == (0, 0, 0)
    assert httpx.get(f"{cached.url}/api/cache/stats").status_code == 401


def test_policies_set_the_ttl_per_tenant_and_model(
    gateway, cached, alice, bob, engine, fake_engine
):
    # The default gateway has RESPONSE_CACHE_SECONDS=0: a model policy turns it on there.
    CachePolicy.objects.create(model=ServedModel.objects.get(name=FAKE_MODEL), ttl_seconds=30)
    client = client_for(gateway, alice)
    ask(client)
    assert ask(client).headers["x-gateway-cache"] == "hit"
    # A tenant policy of 0 turns it off for that tenant, here and where the default is on.
    CachePolicy.objects.create(tenant=bob.tenant, ttl_seconds=0)
    fake_engine.reset()
    for target in (gateway, cached):
        for _ in range(2):
            assert "x-gateway-cache" not in ask(client_for(target, bob)).headers
    assert engine_calls(fake_engine) == 4
