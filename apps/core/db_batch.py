"""Database writes of the /v1 hot path in batches, on the event loop.

One request at a time, a quota reservation or a session turn is a database round trip (or
ten, through the ORM) on a worker thread, and a busy gateway spends its time in them
(measured: ~700 req/s with a quota, ~180 with sessions, ~4,700 with neither). So each
kind of write has a `Batcher`: one connection per worker process, and everything that
arrived while the previous round trip was in flight goes as the next one ("natural
batching": no timer, no added latency when idle). Each batch is one call of a server-side
function that handles its items in arrival order, with the same row locks as one request
alone (apps/quotas and apps/sessions migrations).

If a batch fails as a whole (the connection lost, a row deleted under it), every item gets
the error; callers then redo their own item alone on a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import orjson
import psycopg
from psycopg.types.json import set_json_loads

from apps.core.db import connection_kwargs

logger = logging.getLogger(__name__)

Item = TypeVar("Item")


class Batcher(Generic[Item]):
    """Runs `execute(connection, items)` for everything submitted meanwhile; each
    submitter gets its own item's part of the result (`execute` returns one per item)."""

    def __init__(self, name: str, execute: Callable[..., Any]) -> None:
        self.name = name
        self._execute = execute
        self._pending: list[tuple[Item, asyncio.Future]] = []
        self._draining: asyncio.Task | None = None
        self._connection: psycopg.AsyncConnection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def submit(self, item: Item) -> asyncio.Future:
        """Queue `item` for the next round trip; the future gets its result. Await it
        shielded: a cancelled submitter must not cancel what the batch did for it."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a new event loop (tests): what the old one left is unusable
            self._loop, self._connection, self._pending, self._draining = loop, None, [], None
        future = loop.create_future()
        self._pending.append((item, future))
        if self._draining is None or self._draining.done():
            self._draining = asyncio.ensure_future(self._drain())
        return future

    async def _drain(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                results = await self._execute(await self._connect(), [item for item, _ in batch])
            except Exception as exc:
                await self._close()
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)

    async def _connect(self) -> psycopg.AsyncConnection:
        if self._connection is None or self._connection.closed:
            self._connection = await psycopg.AsyncConnection.connect(
                **{**connection_kwargs(), "application_name": f"gateway-{self.name}"},
                autocommit=True,
            )
            # jsonb a batch function returns: orjson reads it several times faster.
            set_json_loads(orjson.loads, self._connection)
        return self._connection

    async def _close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                await connection.close()
            except psycopg.Error:
                logger.warning("quota %s connection did not close cleanly", self.name)

    async def close(self) -> None:
        if self._loop is not asyncio.get_running_loop():
            self._loop, self._connection, self._pending, self._draining = None, None, [], None
            return  # what another (finished) loop left is unusable, and nothing runs
        if self._draining is not None:
            await asyncio.gather(self._draining, return_exceptions=True)
        await self._close()


def json_array(items: list[bytes]) -> str:
    """A JSON array of items each serialized by its submitter (orjson.dumps), so one that
    cannot be serialized fails its own request, never the batch it would have joined."""
    return (b"[" + b",".join(items) + b"]").decode()
