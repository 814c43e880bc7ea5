"""Server-side chat history through the /v1 pipeline, driven with the OpenAI SDK."""

from __future__ import annotations

import httpx
import openai
import pytest

from apps.engines.models import EngineVariant
from apps.sessions.models import ChatSession, Message
from tests.conftest import FAKE_MODEL

pytestmark = pytest.mark.django_db(transaction=True)


def chat(client: openai.OpenAI, content: str, session: str, **kwargs):
    return client.chat.completions.create(
        model=FAKE_MODEL,
        messages=[{"role": "user", "content": content}],
        extra_headers={"X-Session-Id": session},
        **kwargs,
    )


def sent_messages(fake_engine) -> list[dict]:
    return fake_engine.requests()[-1]["body"]["messages"]


def test_it_prepends_the_stored_history(engine, openai_client, fake_engine):
    chat(openai_client, "my name is Carol", "s-1")
    chat(openai_client, "what is my name?", "s-1")
    assert sent_messages(fake_engine) == [
        {"role": "user", "content": "my name is Carol"},
        {"role": "assistant", "content": "w0 w1 w2 w3 w4 "},
        {"role": "user", "content": "what is my name?"},
    ]


def test_it_keeps_history_for_streamed_turns_and_body_session_ids(
    engine, openai_client, fake_engine
):
    stream = openai_client.chat.completions.create(
        model=FAKE_MODEL,
        messages=[{"role": "user", "content": "first"}],
        stream=True,
        metadata={"session_id": "s-2"},
        extra_body={"fake": {"chunks": 3}},
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "w0 w1 w2 "
    chat(openai_client, "second", "s-2")
    assert [m["content"] for m in sent_messages(fake_engine)] == ["first", "w0 w1 w2 ", "second"]


def test_it_gives_another_tenant_its_own_session_for_the_same_id(
    engine, gateway, alice, bob, fake_engine
):
    alice_client = openai.OpenAI(base_url=gateway.base_url, api_key=alice.raw_key)
    bob_client = openai.OpenAI(base_url=gateway.base_url, api_key=bob.raw_key)
    chat(alice_client, "alice's secret", "shared-id")
    chat(bob_client, "hello", "shared-id")
    assert sent_messages(fake_engine) == [{"role": "user", "content": "hello"}]
    assert ChatSession.objects.filter(external_id="shared-id").count() == 2


def test_it_picks_the_most_specific_system_prompt(engine, openai_client, fake_engine, alice):
    alice.tenant.system_prompt = "tenant prompt"
    alice.tenant.save()
    chat(openai_client, "a", "p-1")
    assert sent_messages(fake_engine)[0] == {"role": "system", "content": "tenant prompt"}
    EngineVariant.objects.filter(model__name=FAKE_MODEL).update(system_prompt="variant prompt")
    chat(openai_client, "b", "p-1")
    assert sent_messages(fake_engine)[0] == {"role": "system", "content": "variant prompt"}
    ChatSession.objects.filter(external_id="p-1").update(system_prompt="session prompt")
    chat(openai_client, "c", "p-1")
    assert sent_messages(fake_engine)[0] == {"role": "system", "content": "session prompt"}
    openai_client.chat.completions.create(
        model=FAKE_MODEL,
        messages=[{"role": "system", "content": "client prompt"}, {"role": "user", "content": "d"}],
        extra_headers={"X-Session-Id": "p-1"},
    )
    sent = sent_messages(fake_engine)
    assert [m["content"] for m in sent if m["role"] == "system"] == ["client prompt"]
    # System prompts are configuration, not history.
    assert not Message.objects.filter(role="system").exists()


def test_it_trims_the_oldest_history_to_the_context_in_tokens(engine, openai_client, fake_engine):
    # The fake engine's /tokenize gives one token per word; 4 tokens of template overhead a message.
    EngineVariant.objects.filter(model__name=FAKE_MODEL).update(
        ctx_size=60, system_prompt="be brief"
    )
    words = " ".join(["word"] * 12)
    for turn in ("one", "two", "three"):
        chat(openai_client, f"{turn} {words}", "t-1", max_tokens=10)
    sent = sent_messages(fake_engine)
    # Budget 60 - 10 = 50 tokens: system + newest user turn are kept; the oldest turns go first.
    assert sent[0] == {"role": "system", "content": "be brief"}
    assert sent[-1]["content"].startswith("three")
    assert not any(m["content"].startswith("one") for m in sent)
    assert sum(len(m["content"].split()) + 4 for m in sent) <= 50


def test_it_never_drops_the_newest_turn_even_if_it_alone_is_too_long(
    engine, openai_client, fake_engine
):
    EngineVariant.objects.filter(model__name=FAKE_MODEL).update(ctx_size=20)
    chat(openai_client, "short", "t-2", max_tokens=5)
    long_turn = " ".join(["x"] * 50)
    chat(openai_client, long_turn, "t-2", max_tokens=5)
    assert sent_messages(fake_engine) == [{"role": "user", "content": long_turn}]


def test_it_records_token_and_timing_metrics_per_message(engine, openai_client):
    chat(openai_client, "count these four", "m-1", extra_body={"fake": {"chunks": 6}})
    list(
        openai_client.chat.completions.create(
            model=FAKE_MODEL,
            messages=[{"role": "user", "content": "and stream"}],
            stream=True,
            extra_headers={"X-Session-Id": "m-1"},
            extra_body={"fake": {"chunks": 4, "chunk_delay": 0.05}},
        )
    )
    messages = list(Message.objects.filter(session__external_id="m-1").order_by("position"))
    assert [m.role for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[0].tokens == 3 + 4  # /tokenize words + template overhead
    first, second = messages[1], messages[3]
    assert (first.prompt_tokens, first.tg_tokens, first.tokens) == (3, 6, 6 + 4)
    assert second.tg_tokens == 4
    assert second.prompt_tokens == 3 + 6 + 2  # the history is part of the prompt now
    for reply in (first, second):
        assert reply.cached_tokens is not None
        assert reply.pp_tokens == reply.prompt_tokens - reply.cached_tokens
        assert (
            reply.pp_started_at
            <= reply.pp_finished_at
            <= reply.tg_started_at
            <= reply.tg_finished_at
        )
    # Streamed: first and last token were seen by the gateway, 3 chunk delays apart.
    assert (second.tg_finished_at - second.tg_started_at).total_seconds() >= 0.1


def test_it_stores_nothing_when_the_engine_fails(engine, openai_client):
    with pytest.raises(openai.InternalServerError):
        chat(openai_client, "boom", "f-1", extra_body={"fake": {"error_status": 500}})
    assert not Message.objects.filter(session__external_id="f-1").exists()


def test_it_rejects_malformed_session_ids(engine, gateway, alice):
    body = {"model": FAKE_MODEL, "messages": [{"role": "user", "content": "x"}]}
    bad_header = httpx.post(
        f"{gateway.base_url}/chat/completions",
        json=body,
        headers={**alice.auth, "X-Session-Id": "a b/c"},
    )
    assert bad_header.status_code == 400
    assert bad_header.json()["error"]["param"] == "X-Session-Id"
    assert bad_header.json()["error"]["code"] == "invalid_session_id"
    bad_body = httpx.post(
        f"{gateway.base_url}/chat/completions",
        json={**body, "metadata": {"session_id": ["x"]}},
        headers=alice.auth,
    )
    assert bad_body.status_code == 400
    assert bad_body.json()["error"]["param"] == "metadata.session_id"
    assert not ChatSession.objects.exists()
