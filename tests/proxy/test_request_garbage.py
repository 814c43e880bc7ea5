"""A finished request leaves no reference cycles behind: its context, hooks and history go
as soon as the request does, not at the next full collection (whose pauses stall every
stream in flight: bench/README.md, "What stalls the full pipeline in (c)")."""

from __future__ import annotations

import gc

import orjson
import pytest
from channels.testing import HttpCommunicator

from apps.engines.client import close_engine_session
from apps.proxy.consumers import ChatCompletionsConsumer
from apps.quotas.services import quota_set
from apps.quotas.stage import quota_stage_drain
from apps.request_logs.writer import request_log_writer
from apps.sessions.stage import session_store_close
from tests.conftest import FAKE_MODEL

pytestmark = pytest.mark.django_db(transaction=True)

REQUESTS = 20


@pytest.fixture(autouse=True)
async def _own_loop_clients() -> None:
    """The engine client, the batchers and the log writer belong to one event loop. (The
    key and registry caches stay on, as in production: Django's ORM leaves cycles of its
    own behind every query, and with the caches a request makes none.)"""
    yield
    await quota_stage_drain()
    await request_log_writer.flush()
    await session_store_close()
    await close_engine_session()


async def post_chat(key, *, session: str, stream: bool) -> dict:
    payload = {"model": FAKE_MODEL, "messages": [{"role": "user", "content": "hi"}]}
    communicator = HttpCommunicator(
        ChatCompletionsConsumer.as_asgi(),
        "POST",
        "/v1/chat/completions",
        body=orjson.dumps({**payload, "stream": stream}),
        headers=[
            (b"authorization", key.auth["Authorization"].encode()),
            (b"x-session-id", session.encode()),
        ],
    )
    return await communicator.get_response(timeout=10)


async def cyclic_garbage_of(requests) -> int:
    """Objects only the collector could free after `requests` ran (collector off)."""
    gc.collect()
    gc.disable()
    try:
        for request in requests:
            assert (await request)["status"] == 200
        return gc.collect()
    finally:
        gc.enable()


async def test_it_leaves_no_reference_cycles_per_request(alice, engine):
    from asgiref.sync import sync_to_async

    await sync_to_async(quota_set)(tenant=alice.tenant, tokens=10_000_000, period="day")
    for stream in (False, True):  # warm: connections, caches, the batchers' tasks
        assert (await post_chat(alice, session="warm", stream=stream))["status"] == 200

    garbage = await cyclic_garbage_of(
        post_chat(alice, session=f"s{i % 4}", stream=i % 2 == 1) for i in range(REQUESTS)
    )

    assert garbage < REQUESTS  # each request's context was ~17 objects of cycles
