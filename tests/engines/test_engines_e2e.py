"""Engine behaviour through the /v1 pipeline: variant choice by size, JSON constraints,
tool calls written as text, rerank, fair scheduling and sticky llama.cpp slots."""

from __future__ import annotations

import asyncio

import httpx
import openai
import orjson
import pytest

from apps.engines.models import Engine, EngineVariant, ServedModel
from tests.conftest import FAKE_MODEL, request_logs, start_gateway, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
]
CALL = '<tool_call>{"name": "get_weather", "arguments": {"location": "Paris"}}</tool_call>'


@pytest.fixture
def sized_model(fake_engine):
    """`sized` served by two engines (same fake process): 64 and 4096 tokens of context."""
    fake_engine.reset()
    model = ServedModel.objects.create(name="sized")
    for name, ctx in (("small", 64), ("big", 4096)):
        engine = Engine.objects.create(name=name, base_url=fake_engine.url, slots=8)
        EngineVariant.objects.create(engine=engine, model=model, ctx_size=ctx)
    return model


def test_it_picks_the_smallest_variant_that_fits(sized_model, openai_client, alice):
    short = [{"role": "user", "content": "hi"}]
    openai_client.chat.completions.create(model="sized", messages=short, max_tokens=16)
    long = [{"role": "user", "content": " ".join(["word"] * 100)}]
    openai_client.chat.completions.create(model="sized", messages=long, max_tokens=16)
    logs = wait_until(lambda: len(request_logs(tenant=alice.tenant)) == 2 and request_logs())
    assert [log.engine for log in logs] == ["small", "big"]


def test_it_refuses_a_request_no_variant_can_hold(sized_model, openai_client, fake_engine):
    huge = [{"role": "user", "content": " ".join(["word"] * 5000)}]
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client.chat.completions.create(model="sized", messages=huge, max_tokens=16)
    error = caught.value.body
    assert error["code"] == "context_length_exceeded"
    assert "64, 4096" in error["message"]
    assert not any(r["path"] == "/v1/chat/completions" for r in fake_engine.requests())


def test_it_turns_response_format_into_llamacpp_json_schema(engine, openai_client, fake_engine):
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    openai_client.chat.completions.create(
        model=FAKE_MODEL,
        messages=[{"role": "user", "content": "x"}],
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}},
    )
    assert fake_engine.requests()[-1]["body"]["json_schema"] == schema
    openai_client.chat.completions.create(
        model=FAKE_MODEL,
        messages=[{"role": "user", "content": "x"}],
        response_format={"type": "json_object"},
    )
    assert fake_engine.requests()[-1]["body"]["json_schema"] == {"type": "object"}


def test_it_returns_tool_calls_written_as_text(engine, openai_client):
    reply = openai_client.chat.completions.create(
        model=FAKE_MODEL,
        messages=[{"role": "user", "content": "weather?"}],
        tools=TOOLS,
        extra_body={"fake": {"reply": CALL, "chunks": 1}},
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    call = choice.message.tool_calls[0]
    assert (call.function.name, orjson.loads(call.function.arguments)) == (
        "get_weather",
        {"location": "Paris"},
    )


def test_it_streams_tool_calls_written_as_text(engine, openai_client):
    stream = openai_client.chat.completions.create(
        model=FAKE_MODEL,
        messages=[{"role": "user", "content": "weather?"}],
        tools=TOOLS,
        stream=True,
        extra_body={"fake": {"reply": "Sure. " + CALL, "chunks": 9}},
    )
    chunks = [c for c in stream if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert text.strip() == "Sure."
    assert [call.function.name for call in calls] == ["get_weather"]
    assert orjson.loads(calls[0].function.arguments) == {"location": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_it_leaves_text_alone_when_the_request_has_no_tools(engine, openai_client):
    reply = openai_client.chat.completions.create(
        model=FAKE_MODEL,
        messages=[{"role": "user", "content": "x"}],
        extra_body={"fake": {"reply": CALL, "chunks": 1}},
    )
    assert reply.choices[0].message.content == CALL


def test_it_reranks_documents(engine, gateway, alice):
    body = {
        "model": FAKE_MODEL,
        "query": "red apple",
        "documents": ["a green pear", "a red apple pie", "red wine"],
        "top_n": 2,
    }
    response = httpx.post(f"{gateway.base_url}/rerank", json=body, headers=alice.auth)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["index"] for r in results] == [1, 2]
    assert results[0]["relevance_score"] >= results[1]["relevance_score"]
    bad = httpx.post(
        f"{gateway.base_url}/rerank", json={**body, "documents": []}, headers=alice.auth
    )
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "documents"


def test_it_sends_a_session_to_the_same_llamacpp_slot(engine, openai_client, fake_engine):
    Engine.objects.filter(pk=engine.pk).update(slots=4)
    for _ in range(3):
        openai_client.chat.completions.create(
            model=FAKE_MODEL,
            messages=[{"role": "user", "content": "x"}],
            extra_headers={"X-Session-Id": "sticky-1"},
        )
    slots = [
        r["body"].get("id_slot")
        for r in fake_engine.requests()
        if r["path"] == "/v1/chat/completions"
    ]
    assert len(slots) == 3
    assert slots[0] is not None
    assert len(set(slots)) == 1


STICKY_WAIT = 0.5  # apps.engines.scheduler.DEFAULT_STICKY_WAIT


@pytest.mark.parametrize(
    ("history_words", "slow_seconds", "expected_slot"),
    [(3, 2.0, 1), (600, 0.15, 0)],
    ids=["short-history-moves-at-once", "long-history-waits-for-its-slot"],
)
def test_it_waits_for_a_sessions_busy_slot_only_for_a_long_history(
    engine, gateway, alice, fake_engine, history_words, slow_seconds, expected_slot
):
    """Recomputing a few tokens elsewhere beats waiting for another request to finish;
    a history of SCHEDULER_STICKY_MIN_TOKENS (256) or more is worth the wait."""
    Engine.objects.filter(pk=engine.pk).update(slots=2)
    session = f"sticky-{history_words}"

    async def run() -> dict[str, tuple[float, float]]:
        times: dict[str, tuple[float, float]] = {}  # tag: (sent, finished)
        clock = asyncio.get_running_loop().time
        async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as client:

            async def chat(tag: str, content: str, session: str | None = None, **fake):
                headers = alice.auth | ({"X-Session-Id": session} if session else {})
                body = {
                    "model": FAKE_MODEL,
                    "messages": [{"role": "user", "content": content}],
                    "fake": fake,
                }
                sent = clock()
                response = await client.post("/chat/completions", json=body, headers=headers)
                assert response.status_code == 200, response.text
                times[tag] = (sent, clock())

            await chat("first", " ".join(["word"] * history_words), session=session)
            slow = asyncio.ensure_future(chat("slow", "busy", delay=slow_seconds))
            await asyncio.to_thread(wait_until, lambda: len(chat_requests(fake_engine)) == 2)
            await chat("second", "and now?", session=session)
            await slow
        return times

    times = asyncio.run(run())
    slots = [r["body"].get("id_slot") for r in chat_requests(fake_engine)]
    # The session had slot 0, the lowest free one, which the slow request (no session, so
    # no id_slot) took next.
    assert [slots[0], slots[2]] == [0, expected_slot]
    sent, finished = times["second"]
    if expected_slot == 1:  # moved at once: no sticky wait, done long before the slow one
        assert finished - sent < STICKY_WAIT
        assert finished < times["slow"][1]
    else:  # waited for the slow request to free its slot
        assert finished > times["slow"][1]


def chat_requests(fake_engine) -> list[dict]:
    return [r for r in fake_engine.requests() if r["path"] == "/v1/chat/completions"]


def test_it_serves_a_single_request_promptly_behind_another_tenants_burst(
    engine, gateway, alice, bob, fake_engine
):
    Engine.objects.filter(pk=engine.pk).update(slots=1)

    async def run() -> None:
        async with httpx.AsyncClient(timeout=60) as client:

            def chat(key: str, tag: str):
                body = {
                    "model": FAKE_MODEL,
                    "messages": [{"role": "user", "content": tag}],
                    "fake": {"delay": 0.05},
                }
                return client.post(
                    f"{gateway.base_url}/chat/completions",
                    json=body,
                    headers={"Authorization": f"Bearer {key}"},
                )

            burst = [asyncio.ensure_future(chat(alice.raw_key, f"alice-{i}")) for i in range(20)]
            await asyncio.sleep(0.2)  # alice's burst is queued behind the single slot
            single = await chat(bob.raw_key, "bob")
            assert single.status_code == 200
            assert all(r.status_code == 200 for r in await asyncio.gather(*burst))

    asyncio.run(run())
    order = [
        r["body"]["messages"][-1]["content"]
        for r in fake_engine.requests()
        if r["path"] == "/v1/chat/completions"
    ]
    # Fair queueing: bob's one request waits for at most one of alice's queued ones.
    bob_at = order.index("bob")
    alice_before = [tag for tag in order[:bob_at] if tag.startswith("alice")]
    assert len(alice_before) <= 6  # the ~4 served during the 0.2 s head start, plus one grant


def test_it_answers_503_with_retry_after_when_the_queue_is_full(engine, alice, tmp_path):
    from django.db import connection

    Engine.objects.filter(pk=engine.pk).update(slots=1)
    gateway = start_gateway(
        connection.settings_dict, tmp_path / "gw.log", env={"SCHEDULER_MAX_QUEUE": "1"}
    )

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as client:
            body = {
                "model": FAKE_MODEL,
                "messages": [{"role": "user", "content": "x"}],
                "fake": {"delay": 1},
            }
            requests = [
                client.post(f"{gateway.base_url}/chat/completions", json=body, headers=alice.auth)
                for _ in range(4)
            ]
            return list(await asyncio.gather(*requests))

    try:
        responses = asyncio.run(run())
    finally:
        gateway.stop()
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200, 200, 503, 503]
    busy = next(r for r in responses if r.status_code == 503)
    assert busy.json()["error"]["code"] == "engine_overloaded"
    assert int(busy.headers["retry-after"]) >= 1


def test_it_records_prompt_cache_hits_per_request(engine, openai_client, alice):
    messages = [{"role": "user", "content": "one two three four"}]
    openai_client.chat.completions.create(model=FAKE_MODEL, messages=messages)
    openai_client.chat.completions.create(
        model=FAKE_MODEL, messages=messages, extra_body={"fake": {"cached": 3}}
    )
    logs = wait_until(lambda: len(request_logs(tenant=alice.tenant)) == 2 and request_logs())
    assert [(log.prompt_tokens, log.cached_tokens) for log in logs] == [(4, 0), (4, 3)]
