"""Server-side chat history through the /v1 pipeline, driven with the OpenAI SDK."""

from __future__ import annotations

import httpx
import openai
import pytest

from apps.engines.models import EngineVariant
from apps.engines.sizing import ASSISTANT_PRIMING_TOKENS
from apps.engines.tokens import heuristic_message_tokens
from apps.sessions.models import ChatSession, Message
from tests.conftest import FAKE_MODEL, request_logs, wait_until

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
    # Token counts: /tokenize gives one per word, plus 4 of template overhead a message:
    # system "be brief" 2 + 4 (heuristic: 8 characters) = 6, each user turn 13 + 4 = 17,
    # each stored reply 5 completion tokens + 4 = 9; a whole turn costs 17 + 9 = 26.
    EngineVariant.objects.filter(model__name=FAKE_MODEL).update(
        ctx_size=86, system_prompt="be brief"
    )
    words = " ".join(["word"] * 12)
    for turn in ("one", "two", "three", "four"):
        chat(openai_client, f"{turn} {words}", "t-1", max_tokens=10)
    sent = sent_messages(fake_engine)
    # Budget 86 - 10 = 76: system 6 + newest 17 + two turns 52 = 75 fits, a third does
    # not (101); so only the oldest turn goes and the two newest before it are kept whole.
    reply = {"role": "assistant", "content": "w0 w1 w2 w3 w4 "}
    assert sent == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": f"two {words}"},
        reply,
        {"role": "user", "content": f"three {words}"},
        reply,
        {"role": "user", "content": f"four {words}"},
    ]


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


def stored(session: str) -> list[Message]:
    return list(Message.objects.filter(session__external_id=session).order_by("position"))


def assert_next_turn_has_no_history(client: openai.OpenAI, session: str, fake_engine) -> None:
    """What the user sees of a turn that stored nothing: the next one starts afresh."""
    chat(client, "again", session)
    assert sent_messages(fake_engine) == [{"role": "user", "content": "again"}]


@pytest.mark.parametrize("stream", [False, True])
def test_it_stores_nothing_when_the_engine_fails(engine, openai_client, fake_engine, stream):
    with pytest.raises(openai.InternalServerError):
        chat(
            openai_client, "boom", "f-1", stream=stream, extra_body={"fake": {"error_status": 500}}
        )
    wait_until(lambda: request_logs(status_code=500))
    assert stored("f-1") == []
    assert_next_turn_has_no_history(openai_client, "f-1", fake_engine)


def test_it_stores_nothing_when_the_client_disconnects_mid_stream(
    engine, gateway, alice, openai_client, fake_engine
):
    body = {
        "model": FAKE_MODEL,
        "messages": [{"role": "user", "content": "tell me a long story"}],
        "stream": True,
        "fake": {"chunks": 300, "chunk_delay": 0.02},
    }
    headers = {**alice.auth, "X-Session-Id": "d-1"}
    with httpx.stream(
        "POST", f"{gateway.base_url}/chat/completions", json=body, headers=headers
    ) as response:
        for line in response.iter_lines():
            if '"w3 "' in line:
                break  # leave with part of the reply received
    wait_until(lambda: request_logs(client_disconnected=True))
    assert stored("d-1") == []
    assert_next_turn_has_no_history(openai_client, "d-1", fake_engine)


def test_it_stores_nothing_when_the_engine_breaks_the_stream(
    engine, gateway, alice, openai_client, fake_engine
):
    body = {
        "model": FAKE_MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "fake": {"chunks": 6, "drop_after": 3},
    }
    response = httpx.post(
        f"{gateway.base_url}/chat/completions",
        json=body,
        headers={**alice.auth, "X-Session-Id": "b-1"},
    )
    assert '"w2 "' in response.text  # the client saw part of the reply ...
    assert "engine_stream_interrupted" in response.text  # ... and then the failure
    wait_until(lambda: request_logs(error_code="engine_stream_interrupted"))
    assert stored("b-1") == []
    assert_next_turn_has_no_history(openai_client, "b-1", fake_engine)


def reply_of(session: str) -> Message:
    wait_until(lambda: stored(session))
    return stored(session)[-1]


@pytest.mark.parametrize(
    ("stream", "fake", "expected"),
    [
        # Whole answer: its text, ~4 characters a token (apps/engines/tokens.py).
        (False, {"no_usage": True, "reply": "abcd" * 10, "chunks": 4}, 10),
        # Stream: one token per event, as llama.cpp sends them.
        (True, {"no_usage": True, "chunks": 6}, 6),
    ],
)
def test_it_estimates_the_reply_tokens_when_the_engine_reports_no_usage(
    engine, openai_client, fake_engine, stream, fake, expected
):
    reply = chat(openai_client, "hello there", "n-1", stream=stream, extra_body={"fake": fake})
    if stream:
        list(reply)
    message = reply_of("n-1")
    assert (message.tg_tokens, message.tokens) == (expected, expected + 4)
    assert message.prompt_tokens > 0
    assert message.pp_tokens == message.prompt_tokens
    assert message.cached_tokens == 0
    assert message.pp_started_at is not None
    assert message.tg_finished_at is not None
    [log] = wait_until(lambda: request_logs(tenant__slug="alice"))
    assert (log.completion_tokens, log.usage_estimated) == (expected, True)


@pytest.mark.parametrize("stream", [False, True])
def test_it_measures_the_timings_itself_when_the_engine_sends_none(engine, openai_client, stream):
    fake = {"no_timings": True, "cached": 2, "chunks": 4, "delay": 0.2, "chunk_delay": 0.05}
    reply = chat(openai_client, "a b c d e", "n-2", stream=stream, extra_body={"fake": fake})
    if stream:
        list(reply)
    message = reply_of("n-2")
    # From usage: 5 prompt words, 2 of them cached, 4 completion tokens.
    assert (message.prompt_tokens, message.cached_tokens, message.pp_tokens) == (5, 2, 3)
    assert message.tg_tokens == 4
    # Measured by the gateway: the engine's 0.2 s delay lies between sending and the end.
    assert (message.tg_finished_at - message.pp_started_at).total_seconds() >= 0.2
    if stream:  # first and last token seen on the wire, 3 chunk delays apart
        assert message.pp_finished_at == message.tg_started_at
        assert message.pp_started_at <= message.tg_started_at
        assert (message.tg_finished_at - message.tg_started_at).total_seconds() >= 0.15


@pytest.mark.parametrize("stream", [False, True])
def test_it_stores_the_cached_tokens_the_engine_reports(engine, openai_client, stream):
    fake = {"cached": 4, "chunks": 3}
    reply = chat(openai_client, "one two three four five six", "c-1", stream=stream,
                 extra_body={"fake": fake})  # fmt: skip
    if stream:
        list(reply)
    message = reply_of("c-1")
    assert (message.prompt_tokens, message.cached_tokens, message.pp_tokens) == (6, 4, 2)


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


@pytest.mark.parametrize("stream", [False, True])
def test_it_stores_a_turn_with_a_nul_character(engine, openai_client, fake_engine, stream):
    """PostgreSQL's jsonb cannot hold U+0000: the stored copy has U+FFFD instead, and
    neither the answer nor the turn is lost."""
    answer = chat(
        openai_client,
        "a\u0000b",
        "nul-1",
        stream=stream,
        extra_body={"fake": {"reply": "c\u0000d"}},
    )

    if stream:
        answer = list(answer)  # the turn is stored as the stream ends
    assert answer
    messages = wait_until(lambda: stored("nul-1"))
    assert [m.payload["content"] for m in messages] == ["a\ufffdb", "c\ufffdd"]


# --- the history as stored text, spliced into the engine's body (migration 0007) ---------

TRICKY = 'é "quoted" \\ back\\slash\nnew line \ufffd 😀 你好 \u2028 </s>'


def test_it_sends_every_stored_turn_exactly_as_it_was_sent_and_answered(
    engine, openai_client, fake_engine
):
    questions = ["plain", TRICKY, '{"json": [1, 2]}', "last"]
    answers = [f"answer {i}: {TRICKY}" for i in range(3)]
    for question, answer in zip(questions, answers, strict=False):
        chat(openai_client, question, "h-1", extra_body={"fake": {"reply": answer}})
    ChatSession.objects.filter(external_id="h-1").update(system_prompt="session prompt")

    chat(openai_client, questions[-1], "h-1")

    expected = [{"role": "system", "content": "session prompt"}]
    for question, answer in zip(questions, answers, strict=False):
        expected += [{"role": "user", "content": question}]
        expected += [{"role": "assistant", "content": answer}]
    assert sent_messages(fake_engine) == [*expected, {"role": "user", "content": "last"}]


def test_it_sends_the_clients_own_system_message_before_the_history(
    engine, openai_client, fake_engine
):
    chat(openai_client, "earlier", "h-2")
    client_system = [
        {"role": "system", "content": "client rules"},
        {"role": "developer", "content": "developer rules"},
    ]

    openai_client.chat.completions.create(
        model=FAKE_MODEL,
        messages=[*client_system, {"role": "user", "content": "now"}],
        extra_headers={"X-Session-Id": "h-2"},
    )

    assert sent_messages(fake_engine) == [
        *client_system,
        {"role": "user", "content": "earlier"},
        {"role": "assistant", "content": "w0 w1 w2 w3 w4 "},
        {"role": "user", "content": "now"},
    ]


def test_it_estimates_the_prompt_with_the_stored_history(engine, openai_client, fake_engine):
    for turn in ("one two three", "four five six seven"):
        chat(openai_client, turn, "h-3")
    history_tokens = sum(m.tokens for m in stored("h-3"))
    new = {"role": "user", "content": "and the last question"}

    chat(openai_client, new["content"], "h-3", extra_body={"fake": {"no_usage": True}})

    # Without the engine's usage, the prompt is charged as estimated: the new message by
    # the heuristic, the history by its stored counts.
    logs = wait_until(lambda: request_logs(tenant__slug="alice", usage_estimated=True))
    assert logs[0].prompt_tokens == (
        history_tokens + heuristic_message_tokens(new) + ASSISTANT_PRIMING_TOKENS
    )
    assert len(sent_messages(fake_engine)) == 5
