"""The whole /v1 pipeline in front of a real llama-server that the gateway runs itself.

A real gateway process manages llama-server with Gemma 3 270M in two context sizes; the
official OpenAI SDK talks to it. Shows what the fake engine cannot: real tokenization for
sizing, a real JSON-schema grammar, real timings and prompt-cache hits on a sticky slot.
Runs when llama-server and the model are installed (bin/install-llama-server); CI
installs them and fails instead of skipping (REQUIRE_REAL_LLAMA=1).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from apps.engines.models import EngineInstance
from apps.sessions.models import Message
from tests.conftest import GatewayProcess, request_logs, start_gateway, wait_until
from tests.engines.manager_helpers import managed_engine
from tests.engines.test_real_llama import (
    INSTALLED_MODELS_DIR,
    MODEL_FILE,
    TEMPLATE,
    require_real_llama,
)

pytestmark = pytest.mark.django_db(transaction=True)

MODEL = "gemma-3-270m"


@pytest.fixture
def gateway(db, tmp_path: Path) -> Iterator[GatewayProcess]:
    from django.db import connection

    require_real_llama()
    env = {
        "ENGINE_MANAGER_AUTOSTART": "1",
        "MODELS_DIR": str(INSTALLED_MODELS_DIR),
        "ENGINE_LOG_DIR": str(tmp_path / "engine-logs"),
        "ENGINE_OWNER_POLL_SECONDS": "0.1",
    }
    gateway = start_gateway(connection.settings_dict, tmp_path / "gateway.log", env=env)
    yield gateway
    gateway.stop()


@pytest.fixture
def gemma(gateway):
    engine, variants = managed_engine(
        "gemma", template=TEMPLATE, model_path=MODEL_FILE, startup_timeout_seconds=60,
        ctx_sizes=(1024, 2048), slots=2, model=MODEL,
    )  # fmt: skip
    return engine, variants


@pytest.fixture
def client(gateway, alice) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key=alice.raw_key, max_retries=0)


def user(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


def running_variant(engine) -> int | None:
    row = EngineInstance.objects.filter(engine=engine, replica=0).first()
    return row.variant_id if row is not None and row.state == "running" else None


def test_it_chats_and_streams_through_a_managed_llama_server(gemma, client, alice) -> None:
    answer = client.chat.completions.create(model=MODEL, messages=user("Say hello."), max_tokens=8)
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=user("Count to three."), max_tokens=8, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip

    assert answer.choices[0].message.content
    assert 1 <= answer.usage.completion_tokens <= 8
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed
    assert chunks[-1].usage.completion_tokens <= 8
    logs = wait_until(lambda: len(request_logs(tenant=alice.tenant)) == 2 and request_logs())
    assert [(log.status_code, log.usage_estimated) for log in logs] == [(200, False)] * 2


def test_it_constrains_the_answer_to_a_json_schema(gemma, client) -> None:
    schema = {
        "type": "object",
        "properties": {"capital": {"type": "string", "maxLength": 20}},
        "required": ["capital"],
        "additionalProperties": False,
    }
    answer = client.chat.completions.create(
        model=MODEL,
        messages=user("What is the capital of France? Answer in JSON."),
        max_tokens=100,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
    )

    choice = answer.choices[0]
    assert choice.finish_reason == "stop", choice.message.content  # not cut off mid-object
    parsed = json.loads(choice.message.content)
    assert list(parsed) == ["capital"]
    assert isinstance(parsed["capital"], str)


def test_it_sizes_with_the_real_tokenizer(gemma, client) -> None:
    """600 times " hello": 900 tokens by the 4-characters heuristic, so with max_tokens 200
    it would not fit 1024; Gemma's tokenizer counts ~600, so the 1024 variant serves it."""
    engine, (small, _) = gemma
    client.chat.completions.create(model=MODEL, messages=user("Hi"), max_tokens=4)
    assert wait_until(lambda: running_variant(engine)) == small.pk

    answer = client.chat.completions.create(
        model=MODEL, messages=user("hello " * 600), max_tokens=200
    )

    assert answer.usage.prompt_tokens < 1024 - 200 < 900
    assert running_variant(engine) == small.pk


def test_it_reuses_the_prompt_cache_of_a_sessions_slot(gemma, client) -> None:
    session = {"X-Session-Id": "cache-me"}
    story = "Once upon a time there was a small robot who loved to paint. " * 8
    for question in ("Who is the story about?", "What did it love?"):
        client.chat.completions.create(
            model=MODEL, messages=user(f"{story}\n{question}"), max_tokens=8,
            extra_headers=session,
        )  # fmt: skip
        story = ""  # the story is in the session's history now

    replies = list(
        Message.objects.filter(session__external_id="cache-me", role="assistant").order_by("pk")
    )
    assert len(replies) == 2
    first, second = replies
    assert first.prompt_tokens > 100
    assert second.prompt_tokens > first.prompt_tokens
    # The second turn's prompt starts with the first one: llama.cpp serves (nearly) all of
    # it from the slot's cache, re-reading only the last few tokens of the template.
    assert second.cached_tokens >= first.prompt_tokens * 0.9
    assert second.pp_tokens < second.prompt_tokens - 100
    assert second.tg_started_at >= second.pp_finished_at
