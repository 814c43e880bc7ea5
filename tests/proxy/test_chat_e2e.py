"""The /v1 pipeline end to end: a real gateway process, the fake engine, the OpenAI SDK."""

from __future__ import annotations

import time

import httpx
import orjson
import pytest

from tests.conftest import FAKE_MODEL, request_logs, wait_until

pytestmark = pytest.mark.django_db(transaction=True)


def test_it_answers_chat_completions(engine, openai_client, alice):
    reply = openai_client.chat.completions.create(
        model=FAKE_MODEL, messages=[{"role": "user", "content": "hello there friend"}]
    )
    assert reply.choices[0].message.content == "w0 w1 w2 w3 w4 "
    assert reply.usage.prompt_tokens == 3
    assert reply.usage.completion_tokens == 5
    log = wait_until(lambda: request_logs(tenant=alice.tenant))[0]
    assert (log.endpoint, log.model, log.engine, log.status_code) == (
        "chat.completions",
        FAKE_MODEL,
        "fake",
        200,
    )
    assert (log.prompt_tokens, log.completion_tokens, log.stream) == (3, 5, False)
    assert log.api_key_id == alice.api_key.pk
    assert log.latency_ms > 0
    assert log.ttft_ms is not None  # from llama.cpp's timings


def test_it_streams_chat_completions_without_usage_unless_asked(engine, openai_client):
    chunks = list(
        openai_client.chat.completions.create(
            model=FAKE_MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "w0 w1 w2 w3 w4 "
    assert all(chunk.usage is None for chunk in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_it_streams_usage_when_the_client_asks(engine, openai_client, alice):
    chunks = list(
        openai_client.chat.completions.create(
            model=FAKE_MODEL,
            messages=[{"role": "user", "content": "one two"}],
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"fake": {"chunks": 7}},
        )
    )
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 7
    log = wait_until(lambda: request_logs(tenant=alice.tenant))[0]
    assert (log.stream, log.prompt_tokens, log.completion_tokens) == (True, 2, 7)
    assert not log.usage_estimated
    assert log.ttft_ms is not None
    assert log.ttft_ms <= log.latency_ms


def test_it_records_usage_of_a_stream_the_client_did_not_ask_usage_for(
    engine, openai_client, alice
):
    list(
        openai_client.chat.completions.create(
            model=FAKE_MODEL, messages=[{"role": "user", "content": "a b c d"}], stream=True
        )
    )
    log = wait_until(lambda: request_logs(tenant=alice.tenant))[0]
    assert (log.prompt_tokens, log.completion_tokens, log.usage_estimated) == (4, 5, False)


def test_it_ends_every_stream_with_done(engine, gateway, alice):
    body = {"model": FAKE_MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True}
    with httpx.stream(
        "POST", f"{gateway.base_url}/chat/completions", json=body, headers=alice.auth
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-accel-buffering"] == "no"
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert lines.count("data: [DONE]") == 1


def test_it_forwards_each_chunk_as_it_arrives(engine, gateway, alice):
    body = {
        "model": FAKE_MODEL,
        "messages": [{"role": "user", "content": "x"}],
        "stream": True,
        "fake": {"chunks": 4, "chunk_delay": 0.4},
    }
    arrivals = []
    with httpx.stream(
        "POST", f"{gateway.base_url}/chat/completions", json=body, headers=alice.auth
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: {") and '"content":"w' in line.replace(" ", ""):
                arrivals.append(time.monotonic())
    assert len(arrivals) == 4
    # Buffered output would arrive all at once at the end; relayed output arrives spread out.
    assert arrivals[-1] - arrivals[0] > 0.8


async def test_it_serves_the_async_sdk_streaming_and_not(engine, async_openai_client):
    reply = await async_openai_client.chat.completions.create(
        model=FAKE_MODEL, messages=[{"role": "user", "content": "hi"}]
    )
    assert reply.choices[0].message.content == "w0 w1 w2 w3 w4 "
    stream = await async_openai_client.chat.completions.create(
        model=FAKE_MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "w0 w1 w2 w3 w4 "


def test_it_answers_completions_streaming_and_not(engine, openai_client, alice):
    reply = openai_client.completions.create(model=FAKE_MODEL, prompt="once upon a time")
    assert reply.choices[0].text == "w0 w1 w2 w3 w4 "
    assert reply.usage.prompt_tokens == 4
    stream = openai_client.completions.create(
        model=FAKE_MODEL, prompt="once", stream=True, extra_body={"fake": {"chunks": 3}}
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == "w0 w1 w2 "
    logs = wait_until(lambda: len(request_logs(tenant=alice.tenant)) == 2 and request_logs())
    assert [(log.endpoint, log.stream, log.completion_tokens) for log in logs] == [
        ("completions", False, 5),
        ("completions", True, 3),
    ]


def test_it_answers_embeddings(engine, openai_client, alice):
    result = openai_client.embeddings.create(model=FAKE_MODEL, input=["alpha beta", "gamma"])
    assert [item.index for item in result.data] == [0, 1]
    assert len(result.data[0].embedding) == 8
    again = openai_client.embeddings.create(model=FAKE_MODEL, input="alpha beta")
    assert again.data[0].embedding == result.data[0].embedding
    log = wait_until(lambda: request_logs(tenant=alice.tenant, endpoint="embeddings"))[0]
    assert log.prompt_tokens == 3


def test_it_lists_models_and_gets_one(engine, openai_client):
    assert sorted(m.id for m in openai_client.models.list()) == [FAKE_MODEL, "other-model"]
    model = openai_client.models.retrieve(FAKE_MODEL)
    assert (model.id, model.object, model.owned_by) == (FAKE_MODEL, "model", "fake")


def test_it_passes_the_usage_chunk_through_untouched_when_asked(engine, gateway, alice):
    body = {
        "model": FAKE_MODEL,
        "messages": [{"role": "user", "content": "x"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream(
        "POST", f"{gateway.base_url}/chat/completions", json=body, headers=alice.auth
    ) as response:
        events = [
            orjson.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")
        ]
    assert events[-1]["usage"]["total_tokens"] == 6
    assert "timings" in events[-1]  # llama.cpp's extra fields pass through


def test_it_resolves_aliases_and_tiers_to_the_model_name(engine, openai_client, fake_engine):
    from apps.engines.models import ServedModel

    ServedModel.objects.filter(name=FAKE_MODEL).update(aliases=["fm", "fake"], tier="light")
    for name in ("fm", "light", FAKE_MODEL):
        reply = openai_client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "hi"}]
        )
        assert reply.choices[0].message.content == "w0 w1 w2 w3 w4 "
        assert fake_engine.requests()[-1]["body"]["model"] == FAKE_MODEL
    assert openai_client.models.retrieve("light").id == FAKE_MODEL
    assert sorted(m.id for m in openai_client.models.list()) == [FAKE_MODEL, "other-model"]
