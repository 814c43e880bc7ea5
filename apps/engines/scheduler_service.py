"""One scheduler for every gateway worker on the host.

`serve --workers N` runs N processes; each would otherwise schedule its own requests, so
an engine with 4 slots could get 4 x N at once, fairness would hold only within a worker
and two workers could hand out the same llama.cpp slot. So `serve` runs the
`SchedulerService` (the plain `Scheduler` of scheduler.py) in a thread of its own,
supervising process, on an abstract Unix socket, and every worker asks it through a
`RemoteScheduler`, which has the same `slot()` as `Scheduler`:

    acquire -> {"id", "replica", "slot", "waited", "sticky"} or {"id", "busy", "retry_after"}
    release / cancel (no answer)

One newline-delimited JSON message each way per step, on one connection per worker. A
worker that dies drops its connection, and the service gives back all it held. If the
service cannot be reached, a worker schedules on its own (the old per-worker behaviour)
and logs why, rather than refusing requests. With one worker, nothing of this runs.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import secrets
import socket
import threading
import time
from typing import Any

import orjson
from django.conf import settings

from apps.engines.scheduler import Placement, Scheduler, SchedulerBusy, SlotRequest, scheduler

logger = logging.getLogger(__name__)

RECONNECT_PAUSE_SECONDS = 1.0  # after a failed connect, schedule locally this long


def socket_path(address: str) -> str:
    """`@name` is Linux's abstract socket namespace (no file to clean up), else a path."""
    return "\0" + address[1:] if address.startswith("@") else address


class SchedulerUnavailable(Exception):
    """The service's connection is gone; schedule locally instead."""


# --- the service (in the `serve` process) ----------------------------------------------


class SchedulerService:
    def __init__(self, local: Scheduler | None = None) -> None:
        self.scheduler = local or Scheduler()

    async def serve(self, address: str) -> asyncio.AbstractServer:
        return await asyncio.start_unix_server(self._client, path=socket_path(address))

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        holders: dict[int, tuple[asyncio.Task, asyncio.Future[None]]] = {}
        try:
            while line := await reader.readline():
                self._handle(orjson.loads(line), writer, holders)
        except (ConnectionError, orjson.JSONDecodeError) as exc:
            logger.warning("scheduler service: dropping a worker connection (%r)", exc)
        finally:
            for task, _ in list(holders.values()):
                task.cancel()  # the worker is gone: its queue places and slots too
            writer.close()

    def _handle(self, message: dict[str, Any], writer: asyncio.StreamWriter, holders) -> None:
        op, request_id = message["op"], message["id"]
        if op == "stats":  # the admin asks: queue and slots of one engine, host-wide
            _answer(writer, {"id": request_id, "stats": self.scheduler.stats(message["engine"])})
        elif op == "acquire":
            released = asyncio.get_running_loop().create_future()
            task = asyncio.ensure_future(self._hold(message, writer, released))
            holders[request_id] = (task, released)
            task.add_done_callback(lambda _: holders.pop(request_id, None))
        elif request_id in holders:
            task, released = holders[request_id]
            if op == "release" and not released.done():
                released.set_result(None)
            elif op == "cancel":
                task.cancel()

    async def _hold(
        self, message: dict[str, Any], writer: asyncio.StreamWriter, released: asyncio.Future
    ) -> None:
        """Hold a slot for the worker from the grant until it says `release`."""
        request_id = message["id"]
        try:
            request = SlotRequest.from_message(message["request"])
            async with self.scheduler.slot(request) as placed:
                answer = {
                    "id": request_id,
                    "replica": placed.replica,
                    "slot": placed.slot,
                    "waited": placed.waited,
                    "sticky": placed.sticky,
                }
                _answer(writer, answer)
                await released
        except SchedulerBusy as busy:
            _answer(
                writer, {"id": request_id, "busy": busy.reason, "retry_after": busy.retry_after}
            )


def _answer(writer: asyncio.StreamWriter, answer: dict[str, Any]) -> None:
    if not writer.is_closing():  # a worker that left gets nothing (its holds are cancelled)
        writer.write(orjson.dumps(answer) + b"\n")


def start_service_thread() -> str:
    """Run a SchedulerService in a daemon thread; its address for SCHEDULER_SOCKET."""
    address = f"@gateway-scheduler-{os.getpid()}-{secrets.token_hex(4)}"
    ready = threading.Event()

    def run() -> None:
        loop = asyncio.new_event_loop()
        loop.run_until_complete(SchedulerService().serve(address))
        ready.set()
        loop.run_forever()

    threading.Thread(target=run, name="scheduler-service", daemon=True).start()
    if not ready.wait(10):
        raise RuntimeError("The scheduler service did not start.")
    return address


# --- the client (in each worker) -------------------------------------------------------


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.reading = asyncio.ensure_future(self._read(reader))

    @property
    def alive(self) -> bool:
        return not self.reading.done()

    def send(self, message: dict[str, Any]) -> None:
        self.writer.write(orjson.dumps(message) + b"\n")

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while line := await reader.readline():
                answer = orjson.loads(line)
                future = self.pending.pop(answer["id"], None)
                if future is not None and not future.done():
                    future.set_result(answer)
        except (ConnectionError, orjson.JSONDecodeError) as exc:
            logger.warning("scheduler service connection lost (%r)", exc)
        finally:
            for future in self.pending.values():
                if not future.done():
                    future.set_exception(SchedulerUnavailable())
            self.pending.clear()


class RemoteScheduler:
    """The host-wide scheduler, through its service; falls back to `local`."""

    def __init__(self, address: str, local: Scheduler) -> None:
        self.address = address
        self.local = local
        self._ids = itertools.count(1)
        self._connection: _Connection | None = None
        self._connecting: asyncio.Lock | None = None
        self._down_until = 0.0

    def slot(self, request: SlotRequest) -> _RemoteLease:
        return _RemoteLease(self, request)

    async def connection(self) -> _Connection | None:
        if self._connection is not None and self._connection.alive:
            return self._connection
        if time.monotonic() < self._down_until:
            return None
        self._connecting = self._connecting or asyncio.Lock()
        async with self._connecting:
            if self._connection is None or not self._connection.alive:
                try:
                    self._connection = _Connection(*await _open(self.address))
                except OSError as exc:
                    logger.error("scheduler service unreachable (%r); scheduling locally", exc)
                    self._down_until = time.monotonic() + RECONNECT_PAUSE_SECONDS
                    return None
        return self._connection

    def next_id(self) -> int:
        return next(self._ids)


async def _open(address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    # Connected by hand: uvloop refuses an abstract address given as `path` (EINVAL).
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, socket_path(address))
    except OSError:
        sock.close()
        raise
    return await asyncio.open_unix_connection(sock=sock)


class _RemoteLease:
    def __init__(self, remote: RemoteScheduler, request: SlotRequest):
        self._remote = remote
        self._request = request
        self._held: tuple[_Connection, int] | None = None
        self._local: Any = None  # the fallback's lease, when the service is unreachable

    async def __aenter__(self) -> Placement:
        connection = await self._remote.connection()
        if connection is not None:
            try:
                return await self._acquire(connection)
            except SchedulerUnavailable:
                pass
        self._local = self._remote.local.slot(self._request)
        return await self._local.__aenter__()

    async def _acquire(self, connection: _Connection) -> Placement:
        request_id = self._remote.next_id()
        future = asyncio.get_running_loop().create_future()
        connection.pending[request_id] = future
        connection.send(
            {
                "op": "acquire",
                "id": request_id,
                "request": self._request.as_message(),
            }
        )
        try:
            answer = await future
        except asyncio.CancelledError:
            connection.pending.pop(request_id, None)
            if connection.alive:  # gives back a slot granted meanwhile, or the queue place
                connection.send({"op": "cancel", "id": request_id})
            raise
        if "busy" in answer:
            raise SchedulerBusy(self._request.engine_key, answer["retry_after"], answer["busy"])
        self._held = (connection, request_id)
        return Placement(
            self._request.engine_key,
            answer["replica"],
            answer["slot"],
            answer["waited"],
            answer["sticky"],
            time.monotonic(),
        )

    async def __aexit__(self, *exc_info: object) -> None:
        if self._local is not None:
            await self._local.__aexit__(*exc_info)
            return
        held, self._held = self._held, None
        if held is not None and held[0].alive:
            held[0].send({"op": "release", "id": held[1]})


def scheduler_stats(engine_key: str, *, timeout: float = 1.0) -> dict[str, Any] | None:
    """The engine's queue and slots as the scheduler that serves requests sees them: the
    host-wide service's when `serve` runs one, else this process's; None if the service
    does not answer. Blocking (for the admin's sync views), one short connection."""
    if not settings.SCHEDULER_SOCKET:
        try:
            return scheduler.stats(engine_key)
        except RuntimeError:  # the event loop changed it while this thread read it
            return None
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(socket_path(settings.SCHEDULER_SOCKET))
            sock.sendall(orjson.dumps({"op": "stats", "id": 0, "engine": engine_key}) + b"\n")
            with sock.makefile("rb") as answers:
                return orjson.loads(answers.readline())["stats"]
    except (OSError, ValueError, KeyError) as exc:
        logger.warning("scheduler service did not answer for stats (%r)", exc)
        return None


_remote: RemoteScheduler | None = None


def worker_scheduler() -> Scheduler | RemoteScheduler:
    """The host-wide scheduler when `serve` runs one (several workers), else this process's."""
    global _remote
    if not settings.SCHEDULER_SOCKET:
        return scheduler
    if _remote is None:
        _remote = RemoteScheduler(settings.SCHEDULER_SOCKET, scheduler)
    return _remote
