"""The history cache through the /v1 pipeline: a gateway holding sessions' histories sends
the engine what one without the cache sends (SESSION_HISTORY_CACHE_MB=0), turn after
turn, with turns recorded by other processes and messages deleted in between."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from apps.engines.models import EngineVariant
from apps.sessions.models import Message
from tests.conftest import FAKE_MODEL, GatewayProcess, start_gateway

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(scope="module")
def uncached_gateway(
    django_db_setup, django_db_blocker, tmp_path_factory
) -> Iterator[GatewayProcess]:
    from django.db import connection

    log_path = tmp_path_factory.mktemp("uncached") / "gateway.log"
    gateway = start_gateway(
        connection.settings_dict, log_path, env={"SESSION_HISTORY_CACHE_MB": "0"}
    )
    yield gateway
    gateway.stop()


def client_of(gateway: GatewayProcess, tenant) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key=tenant.raw_key, max_retries=0)


def sent_after(client: openai.OpenAI, fake_engine, session: str, content: str) -> list[dict]:
    """The messages the engine got for one request of the session."""
    client.chat.completions.create(
        model=FAKE_MODEL,
        messages=[{"role": "user", "content": content}],
        extra_headers={"X-Session-Id": session},
        max_tokens=10,
    )
    return fake_engine.requests()[-1]["body"]["messages"]


@pytest.mark.parametrize("ctx_size", [4096, 90])
def test_it_sends_what_a_gateway_without_the_cache_sends(
    engine, gateway, uncached_gateway, alice, fake_engine, ctx_size
):
    EngineVariant.objects.filter(model__name=FAKE_MODEL).update(ctx_size=ctx_size)
    cached, uncached = client_of(gateway, alice), client_of(uncached_gateway, alice)
    for turn in range(6):
        text = f"turn {turn} " + "word " * 8
        assert sent_after(cached, fake_engine, "c-on", text) == sent_after(
            uncached, fake_engine, "c-off", text
        )


def test_it_includes_turns_another_process_served(
    engine, gateway, uncached_gateway, alice, fake_engine
):
    cached, other = client_of(gateway, alice), client_of(uncached_gateway, alice)
    sent_after(cached, fake_engine, "shared", "one")
    sent_after(other, fake_engine, "shared", "two")

    sent = sent_after(cached, fake_engine, "shared", "three")

    assert [m["content"] for m in sent if m["role"] == "user"] == ["one", "two", "three"]


def test_it_never_sends_a_deleted_message_from_the_cache(engine, gateway, alice, fake_engine):
    cached = client_of(gateway, alice)
    sent_after(cached, fake_engine, "forget", "my secret is 1234")
    sent_after(cached, fake_engine, "forget", "hello")
    Message.objects.filter(payload__content__icontains="secret").delete()

    sent = sent_after(cached, fake_engine, "forget", "what was my secret?")

    assert [m["content"] for m in sent if m["role"] == "user"] == ["hello", "what was my secret?"]
