"""A failure after the response has started: the status is already out, so a stream ends
with an OpenAI-shaped error event and [DONE], and any other body is finished, never left
half-written (the client would wait for the rest of it)."""

from __future__ import annotations

import orjson
import pytest
from channels.testing import HttpCommunicator

from apps.proxy.consumers import V1Consumer


class BreaksAfterHeaders(V1Consumer):
    """Starts its answer, then fails as a late pipeline stage could (storing a turn)."""

    stream = True

    async def handle(self, body: bytes) -> None:
        content_type = b"text/event-stream" if self.stream else b"application/json"
        await self.send_headers(status=200, headers=[(b"content-type", content_type)])
        first = b'data: {"choices": []}\n\n' if self.stream else b'{"partial": '
        await self.send_body(first, more_body=True)
        raise RuntimeError("the session store failed")


class WholeBreaksAfterHeaders(BreaksAfterHeaders):
    stream = False


async def respond(consumer: type[V1Consumer]) -> dict:
    communicator = HttpCommunicator(consumer.as_asgi(), "POST", "/v1/x", body=b"{}")
    return await communicator.get_response(timeout=5)


async def test_it_ends_a_started_stream_with_an_error_event_and_done() -> None:
    response = await respond(BreaksAfterHeaders)

    assert response["status"] == 200
    events = [e for e in response["body"].split(b"\n\n") if e]
    assert events[0] == b'data: {"choices": []}'
    error = orjson.loads(events[1].removeprefix(b"data: "))["error"]
    assert (error["type"], error["code"]) == ("api_error", "internal_error")
    assert events[2] == b"data: [DONE]"


async def test_it_finishes_a_started_whole_response() -> None:
    response = await respond(WholeBreaksAfterHeaders)  # returns only once the body ended

    assert (response["status"], response["body"]) == (200, b'{"partial": ')


@pytest.mark.parametrize("consumer", [BreaksAfterHeaders, WholeBreaksAfterHeaders])
async def test_it_never_sends_a_second_response(consumer) -> None:
    communicator = HttpCommunicator(consumer.as_asgi(), "POST", "/v1/x", body=b"{}")
    await communicator.get_response(timeout=5)
    assert await communicator.receive_nothing(timeout=0.2)
