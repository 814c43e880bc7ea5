"""Safety rules on /v1, end to end: a real gateway process, the fake engine, the SDK."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from django.core.management import call_command

from apps.safety.models import SafetyEvent
from apps.sessions.models import Message
from tests.conftest import FAKE_MODEL, request_logs, wait_until
from tests.safety.helpers import read_until_error

pytestmark = pytest.mark.django_db(transaction=True)


def add_rule(name: str, stage: str, pattern: str, *extra: str) -> None:
    call_command("add_safety_rule", name, "--stage", stage, "--regex", pattern, *extra)


def chat(client: openai.OpenAI, content: str, **kwargs):
    return client.chat.completions.create(
        model=FAKE_MODEL, messages=[{"role": "user", "content": content}], **kwargs
    )


def engine_calls(fake_engine) -> list[dict]:
    return [r for r in fake_engine.requests() if r["path"] == "/v1/chat/completions"]


def test_it_blocks_a_prompt_before_the_engine_with_the_rule_name_only(
    engine, openai_client, fake_engine
):
    add_rule("no-bombs", "prompt", r"(?i)build a bomb")
    with pytest.raises(openai.BadRequestError) as refused:
        chat(openai_client, "Tell me how to BUILD A BOMB please")
    error = refused.value.body
    assert error["code"] == "content_filter"
    assert "no-bombs" in error["message"]
    assert "bomb" not in error["message"].replace("no-bombs", "")
    assert engine_calls(fake_engine) == []
    assert chat(openai_client, "Tell me a joke").choices[0].message.content


def test_it_sends_a_redacted_prompt_to_the_engine_and_stores_it_redacted(
    engine, openai_client, fake_engine
):
    call_command(
        "add_safety_rule", "pii", "--stage", "prompt", "--preset", "emails", "--action", "redact"
    )
    chat(
        openai_client,
        "mail bob@example.com about it",
        extra_headers={"X-Session-Id": "red-1"},
    )
    sent = engine_calls(fake_engine)[-1]["body"]["messages"]
    assert sent[-1]["content"] == "mail [REDACTED] about it"
    stored = wait_until(lambda: list(Message.objects.filter(role="user")))
    assert stored[0].payload["content"] == "mail [REDACTED] about it"


def test_it_redacts_completions_prompts_too(engine, gateway, alice, fake_engine):
    call_command(
        "add_safety_rule", "keys", "--stage", "prompt", "--preset", "secrets", "--action", "redact"
    )
    client = openai.OpenAI(base_url=gateway.base_url, api_key=alice.raw_key, max_retries=0)
    client.completions.create(model=FAKE_MODEL, prompt="key AKIAABCDEFGHIJKLMNOP ok")
    prompts = [
        r["body"]["prompt"] for r in fake_engine.requests() if r["path"] == "/v1/completions"
    ]
    assert prompts == ["key [REDACTED] ok"]


def test_it_cuts_a_stream_at_a_match_spanning_two_chunks_and_cancels_the_engine(
    engine, openai_client, fake_engine
):
    add_rule("launch-codes", "response", r"launch code \d{4}")
    intro = "Sure, here is a long and perfectly harmless introduction to it all. " * 2
    pieces = [intro, "The launch co", "de 1234 is", " secret."] + ["more "] * 200
    stream = chat(
        openai_client,
        "tell me",
        stream=True,
        extra_body={"fake": {"pieces": pieces, "chunk_delay": 0.01}},
    )
    chunks, error = read_until_error(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "launch" not in text
    assert "1234" not in text
    assert text
    assert intro.startswith(text)
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    assert error is not None
    assert "launch-codes" in error.message
    record = wait_until(
        lambda: next((r for r in engine_calls(fake_engine) if r["cancelled"]), None)
    )
    assert record["chunks_sent"] < len(pieces)


def test_it_ends_a_blocked_stream_with_an_error_event_then_done(engine, gateway, alice):
    add_rule("launch-codes", "response", r"launch code \d{4}")
    body = {
        "model": FAKE_MODEL,
        "stream": True,
        "messages": [{"role": "user", "content": "x"}],
        "fake": {"pieces": ["the launch ", "code 9999"]},
    }
    raw = httpx.post(f"{gateway.base_url}/chat/completions", json=body, headers=alice.auth).text
    events = [e for e in raw.split("\n\n") if e]
    assert '"finish_reason":"content_filter"' in events[-3]
    assert '"code":"content_filter"' in events[-2]
    assert "launch-codes" in events[-2]
    assert events[-1] == "data: [DONE]"
    assert "9999" not in raw


def test_it_redacts_a_streamed_answer(engine, openai_client):
    call_command(
        "add_safety_rule", "pii", "--stage", "response", "--preset", "emails", "--action", "redact"
    )
    stream = chat(
        openai_client,
        "x",
        stream=True,
        extra_body={"fake": {"pieces": ["write to ann@", "example.org", " today"]}},
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "write to [REDACTED] today"


def test_it_replaces_a_blocked_whole_answer_with_content_filter(engine, openai_client):
    add_rule("launch-codes", "response", r"launch code \d{4}")
    answer = chat(openai_client, "x", extra_body={"fake": {"reply": "the launch code 4321 ok"}})
    assert answer.choices[0].finish_reason == "content_filter"
    assert not answer.choices[0].message.content
    redacted = "pii"
    call_command(
        "add_safety_rule",
        redacted,
        "--stage",
        "response",
        "--preset",
        "emails",
        "--action",
        "redact",
    )
    answer = chat(openai_client, "x", extra_body={"fake": {"reply": "ask eve@example.net"}})
    assert answer.choices[0].message.content == "ask [REDACTED]"


def test_it_stores_what_the_client_got_in_the_session_not_the_unsafe_text(engine, openai_client):
    add_rule("launch-codes", "response", r"launch code \d{4}")
    chat(
        openai_client,
        "x",
        extra_headers={"X-Session-Id": "s-cut"},
        extra_body={"fake": {"reply": "the launch code 4321"}},
    )
    replies = wait_until(lambda: list(Message.objects.filter(role="assistant")))
    assert "4321" not in str(replies[0].payload)


def test_a_blocked_prompt_is_stored_in_the_session_as_a_refusal_not_its_text(engine, openai_client):
    add_rule("no-bombs", "prompt", r"(?i)build a bomb")
    chat(openai_client, "hello", extra_headers={"X-Session-Id": "s-refused"})
    with pytest.raises(openai.BadRequestError):
        chat(openai_client, "how to build a bomb", extra_headers={"X-Session-Id": "s-refused"})

    wait_until(lambda: Message.objects.count() == 4)
    messages = list(Message.objects.order_by("position"))
    assert [m.role for m in messages] == ["user", "assistant", "user", "assistant"]
    assert "bomb" not in str(messages[2].payload)
    assert "refused by a safety rule" in messages[2].payload["content"]
    assert "`no-bombs`" in messages[3].payload["content"]
    # The next turn still works, with the refusal in its history (and not the text).
    chat(openai_client, "ok then", extra_headers={"X-Session-Id": "s-refused"})


def test_it_applies_a_tenant_rule_to_that_tenant_only(engine, gateway, alice, bob):
    add_rule("alice-only", "prompt", r"pineapple", "--tenant", "alice")
    alice_client = openai.OpenAI(base_url=gateway.base_url, api_key=alice.raw_key, max_retries=0)
    bob_client = openai.OpenAI(base_url=gateway.base_url, api_key=bob.raw_key, max_retries=0)
    with pytest.raises(openai.BadRequestError):
        chat(alice_client, "I like pineapple")
    assert chat(bob_client, "I like pineapple").choices[0].message.content


def test_it_answers_a_pathological_pattern_on_a_1_mb_prompt_quickly(engine, openai_client):
    add_rule("catastrophic", "prompt", r"(a+)+$")
    started = time.monotonic()
    answer = chat(openai_client, "a" * 1_000_000 + "!")
    assert answer.choices[0].message.content
    # A backtracking engine would take longer than the universe's age; RE2 is linear.
    assert time.monotonic() - started < 30
    with pytest.raises(openai.BadRequestError):
        chat(openai_client, "a" * 1_000_000)


def test_it_records_events_of_what_it_did(engine, openai_client, alice):
    add_rule("no-bombs", "prompt", r"bomb")
    with pytest.raises(openai.BadRequestError):
        chat(openai_client, "a bomb")
    event = wait_until(lambda: SafetyEvent.objects.first())
    assert (event.tenant_id, event.rule_name, event.action, event.stage) == (
        alice.tenant.pk,
        "no-bombs",
        "block",
        "prompt",
    )
    assert "bomb" in event.excerpt


def test_it_notes_the_safety_action_in_the_request_log(engine, openai_client, alice):
    call_command(
        "add_safety_rule", "pii", "--stage", "prompt", "--preset", "emails", "--action", "redact"
    )
    add_rule("no-bombs", "prompt", r"bomb")
    chat(openai_client, "write to a@b.org")
    with pytest.raises(openai.BadRequestError):
        chat(openai_client, "a bomb")
    chat(openai_client, "nothing to see")
    logs = wait_until(lambda: len(request_logs()) == 3 and request_logs())
    assert [log.safety_action for log in logs] == ["redact", "block", ""]
    assert logs[1].error_code == "content_filter"
