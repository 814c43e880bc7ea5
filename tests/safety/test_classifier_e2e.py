"""Classifier (model) rules end to end: the fake engine plays Llama Guard (`fake-guard`
answers `unsafe\\nS2` when it is shown `fake-unsafe:S2`, else `safe`)."""

from __future__ import annotations

import openai
import pytest
from django.core.management import call_command

from apps.safety.models import SafetyEvent
from tests.conftest import FAKE_MODEL, free_port, wait_until
from tests.safety.helpers import read_until_error

pytestmark = pytest.mark.django_db(transaction=True)

GUARD = "fake-guard"
UNSAFE = "how do I pick this lock fake-unsafe:S2"


@pytest.fixture
def guard(engine, fake_engine):
    from apps.engines.services import engine_register_external

    engine_register_external(name="guard", base_url=fake_engine.url, models=[GUARD])
    # Nothing listens there: a classifier that is down.
    engine_register_external(
        name="down", base_url=f"http://127.0.0.1:{free_port()}", models=["down-guard"]
    )
    return GUARD


def model_rule(name: str, stage: str, model: str = GUARD, *extra: str) -> None:
    call_command("add_safety_rule", name, "--stage", stage, "--model", model, *extra)


def chat(client: openai.OpenAI, content: str, **kwargs):
    return client.chat.completions.create(
        model=FAKE_MODEL, messages=[{"role": "user", "content": content}], **kwargs
    )


def guard_calls(fake_engine) -> list[dict]:
    return [r for r in fake_engine.requests() if r["body"] and r["body"].get("model") == GUARD]


def test_it_blocks_an_unsafe_prompt_with_a_classifier(guard, openai_client, fake_engine):
    model_rule("guard-prompt", "prompt")
    with pytest.raises(openai.BadRequestError) as refused:
        chat(openai_client, UNSAFE)
    assert refused.value.body["code"] == "content_filter"
    assert "guard-prompt" in refused.value.body["message"]
    assert chat(openai_client, "hello there").choices[0].message.content
    asked = guard_calls(fake_engine)[0]["body"]["messages"][0]["content"]
    assert "<BEGIN CONVERSATION>\n\nUser: how do I pick this lock" in asked
    assert "S2: Non-Violent Crimes." in asked
    assert "grammar" in guard_calls(fake_engine)[0]["body"]  # llama.cpp: verdict-shaped only
    event = wait_until(lambda: SafetyEvent.objects.first())
    assert (event.rule_name, event.action, event.categories) == ("guard-prompt", "block", "S2")


def test_it_blocks_only_the_categories_the_rule_names(guard, openai_client):
    model_rule("violence-only", "prompt", GUARD, "--categories", "S1")
    assert chat(openai_client, UNSAFE).choices[0].message.content


def test_it_blocks_an_unsafe_whole_answer(guard, openai_client):
    model_rule("guard-answer", "response")
    answer = chat(openai_client, "hi", extra_body={"fake": {"reply": "sure: fake-unsafe:S2"}})
    assert answer.choices[0].finish_reason == "content_filter"
    assert not answer.choices[0].message.content
    fine = chat(openai_client, "hi", extra_body={"fake": {"reply": "hello"}})
    assert fine.choices[0].message.content == "hello"


def test_it_stops_an_unsafe_stream_while_it_runs_and_cancels_the_engine(
    guard, openai_client, fake_engine
):
    model_rule("guard-answer", "response")
    pieces = ["Step one: fake-unsafe:S2 "] + [f"w{i} " for i in range(300)]
    stream = chat(
        openai_client,
        "hi",
        stream=True,
        extra_body={"fake": {"pieces": pieces, "chunk_delay": 0.01}},
    )
    chunks, error = read_until_error(stream)
    assert error is not None
    assert "guard-answer" in error.message
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "w299" not in text

    def answer_cancelled() -> bool:
        calls = [r for r in fake_engine.requests() if r["body"].get("model") == FAKE_MODEL]
        return calls[0]["cancelled"]

    assert wait_until(answer_cancelled)


def test_a_classifier_that_is_down_fails_closed_for_a_block_rule(guard, openai_client):
    model_rule("down-closed", "prompt", "down-guard")
    with pytest.raises(openai.BadRequestError, match="down-closed"):
        chat(openai_client, "hello")
    event = wait_until(lambda: SafetyEvent.objects.first())
    assert event.action == "block"
    assert "classifier failed: engine unreachable" in event.detail
    assert "fail-closed" in event.detail


def test_a_classifier_that_is_down_lets_text_through_when_fail_open(guard, openai_client):
    model_rule("down-open", "prompt", "down-guard", "--fail-open")
    assert chat(openai_client, "hello").choices[0].message.content
    event = wait_until(lambda: SafetyEvent.objects.first())
    assert (event.action, "fail-open" in event.detail) == ("flag", True)


def test_it_moderates_through_the_sdk(guard, openai_client, gateway, bob):
    model_rule("guard-prompt", "prompt")
    call_command(
        "add_safety_rule",
        "bobs-words",
        "--stage",
        "prompt",
        "--regex",
        "pineapple",
        "--tenant",
        "bob",
    )
    call_command(
        "add_safety_rule",
        "no-spam",
        "--stage",
        "prompt",
        "--regex",
        "(?i)buy now",
        "--action",
        "flag",
    )
    result = openai_client.moderations.create(input=[UNSAFE, "BUY NOW cheap", "pineapple pizza"])
    unsafe, spam, pizza = result.results
    assert unsafe.flagged
    assert unsafe.categories.illicit
    assert not unsafe.categories.violence
    assert unsafe.category_scores.illicit == 1.0
    assert spam.flagged
    assert [r["name"] for r in spam.model_extra["rules"]] == ["no-spam"]
    assert not pizza.flagged  # bob's rule is not alice's
    bob_client = openai.OpenAI(base_url=gateway.base_url, api_key=bob.raw_key, max_retries=0)
    assert bob_client.moderations.create(input="pineapple pizza").results[0].flagged


def test_it_refuses_bad_moderation_requests(guard, openai_client, gateway):
    with pytest.raises(openai.BadRequestError, match="`input` must be"):
        openai_client.moderations.create(input=[])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(
            base_url=gateway.base_url, api_key="sk-nope", max_retries=0
        ).moderations.create(input="x")


def test_it_shows_the_classifier_a_sessions_stored_history(guard, openai_client, fake_engine):
    session = {"X-Session-Id": "guarded-1"}
    chat(openai_client, "my first question", extra_headers=session)
    model_rule("guard-prompt", "prompt")

    chat(openai_client, "my second question", extra_headers=session)

    asked = guard_calls(fake_engine)[-1]["body"]["messages"][0]["content"]
    assert "User: my first question\n\nAgent: w0 w1 w2 w3 w4 \n\nUser: my second question" in asked
