"""The engine manager: the one place that starts and stops managed engine processes.

One `EngineManager` per gateway process (`engine_manager`). A request asks it for a
lease on one replica of a managed engine running one variant:

    async with engine_manager.acquire(engine_id=..., variant_id=..., replica=0) as lease:
        ...  # call lease.base_url; the request counts as in flight while the lease is held

Ownership. Exactly one gateway process owns (launches, watches, stops) a replica: the one
holding its PostgreSQL advisory lock (see instance_store). The owner publishes the
replica's state on its EngineInstance row; every other process admits its requests
through that row (an atomic counter, so drains see them) and asks the owner for another
variant or an operator action by writing on it. The owner polls the row every
ENGINE_OWNER_POLL_SECONDS. If the owner dies, PostgreSQL releases the lock and the next
process that needs the replica (or notices its heartbeat stopped) takes over, first
killing the previous owner's engine process if it is still running.

Swaps. A replica runs one variant at a time. When a request needs another one, a swap
starts: it waits for the requests in flight on the old variant (bounded by
ENGINE_DRAIN_TIMEOUT_SECONDS), stops it, starts the new one and waits for /health. While
the swap has waited less than ENGINE_SWAP_GRACE_SECONDS, requests for the old variant are
still admitted (a short burst does not force a swap to wait for an idle gap); after that
they queue behind the swap, and the next swap goes to the variant that has waited longest,
so neither side starves. Every request waiting for the new variant proceeds once it is
healthy: one swap serves them all, and a failed start fails them all with its error.

Crashes are restarted with backoff (ENGINE_RESTART_BACKOFF_SECONDS, doubling); more than
ENGINE_CRASH_LOOP_LIMIT crashes within ENGINE_CRASH_LOOP_WINDOW_SECONDS mark the replica
failed until the next request. A replica with an idle TTL stops once nothing used it for
that long; a replica with nothing running gives up its ownership.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import psutil
import psycopg
from channels.db import database_sync_to_async
from django.conf import settings
from django.core.exceptions import ValidationError

from apps.engines.engine_process import EngineProcess, EngineStartError, ProcessLog, free_port
from apps.engines.instance_store import NOW, Admission, ControlConnection, lock_key
from apps.engines.launch import LaunchSpec, render_command
from apps.engines.models import Engine, EngineInstance, EngineVariant
from apps.engines.registry import EngineRoute

__all__ = ["EngineManager", "EngineStartError", "ReplicaLease", "engine_manager"]

logger = logging.getLogger(__name__)

State = EngineInstance.State
Key = tuple[int, int]  # (engine id, replica)
LOG_PUBLISH_SECONDS = 2.0
FOLLOWER_POLL_MAX = 0.25  # a waiting non-owner re-reads the row at least this often
SERVING_URL_CACHE_SECONDS = 1.0


def swap_grace() -> float:
    return settings.ENGINE_SWAP_GRACE_SECONDS


def drain_timeout() -> float:
    return settings.ENGINE_DRAIN_TIMEOUT_SECONDS


def poll_interval() -> float:
    return settings.ENGINE_OWNER_POLL_SECONDS


def owner_stale_after() -> float:
    return settings.ENGINE_OWNER_STALE_SECONDS


# --- configuration read from the database (never on the hot path) --------------------


@dataclass(frozen=True)
class VariantConfig:
    id: int
    label: str
    ctx_size: int | None
    model_path: str
    extra_args: str


def _managed_engine(engine_id: int, replica: int) -> Engine:
    engine = Engine.objects.filter(pk=engine_id).first()
    if engine is None:
        raise EngineStartError(f"Engine {engine_id} does not exist.")
    if not engine.is_managed:
        raise EngineStartError(f"Engine {engine.name} is not managed by the gateway.")
    if not 0 <= replica < engine.replicas:
        raise EngineStartError(f"Engine {engine.name} has no replica {replica}.")
    return engine


@database_sync_to_async
def _engine_row(engine_id: int, replica: int) -> tuple[EngineRoute, int, int | None]:
    """The engine's launch settings and its instance row (created on first use)."""
    engine = _managed_engine(engine_id, replica)
    row, _ = EngineInstance.objects.get_or_create(engine=engine, replica=replica)
    return EngineRoute.of(engine), row.pk, row.variant_id


@database_sync_to_async
def _variant(engine_id: int, variant_id: int) -> tuple[EngineRoute, VariantConfig]:
    variant = (
        EngineVariant.objects.select_related("engine", "model")
        .filter(pk=variant_id, engine_id=engine_id)
        .first()
    )
    if variant is None:
        raise EngineStartError(f"Engine {engine_id} has no variant {variant_id}.")
    config = VariantConfig(
        id=variant.pk,
        label=variant.label,
        ctx_size=variant.ctx_size,
        model_path=variant.model_path,
        extra_args=variant.extra_args,
    )
    return EngineRoute.of(variant.engine), config


@database_sync_to_async
def _first_variant_id(engine_id: int) -> int | None:
    return (
        EngineVariant.objects.filter(engine_id=engine_id)
        .order_by("pk")
        .values_list("pk", flat=True)
        .first()
    )


# --- previous owners' processes ------------------------------------------------------


def _kill_orphan(pid: int, argv: list[str], started_at: datetime | None, grace: float) -> bool:
    """Stop a process a dead owner launched, if that pid is still that process (same
    command line, same start time): a recycled pid must never be killed."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE or proc.cmdline() != argv:
            return False
        if started_at is not None and abs(proc.create_time() - started_at.timestamp()) > 5:
            return False
        group = os.getpgid(pid) == pid  # launched as a session leader: stop its group
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            os.killpg(pid, sig) if group else proc.send_signal(sig)
            if _gone(proc, timeout=wait):
                break
    except (psutil.Error, ProcessLookupError, PermissionError):
        return False
    return True


def _gone(proc: psutil.Process, *, timeout: float) -> bool:
    """Exited (a zombie counts: its reaper is init, not us)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


# --- owner side: one replica ---------------------------------------------------------


class OwnershipLost(Exception):
    """This process stopped owning the replica while a request waited on it."""


async def finish(task: asyncio.Task) -> None:
    """Cancel `task` and wait until it is done. Unlike `suppress(CancelledError)` around
    `await task`, this never swallows a cancellation of the caller itself."""
    task.cancel()
    await asyncio.wait({task})


class Signal:
    """Wake every current waiter; later waiters wait for the next fire()."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, seconds: float | None = None) -> None:
        if seconds is None:
            await self._event.wait()
            return
        # asyncio.wait, not wait_for: Python 3.11's wait_for can swallow a cancellation
        # that arrives as the event fires.
        waiter = asyncio.ensure_future(self._event.wait())
        try:
            await asyncio.wait({waiter}, timeout=seconds)
        finally:
            waiter.cancel()


@dataclass(eq=False)
class Swap:
    """A pending change of what the replica runs (`target` None: stop)."""

    target: int | None
    reason: str
    since: float = field(default_factory=time.monotonic)
    done: bool = False


class Replica:
    """What the owner knows and does for one replica. Only its driver task launches,
    swaps and stops; requests, the crash watcher and the tick just change flags and wake it."""

    def __init__(
        self,
        *,
        manager: EngineManager,
        engine: EngineRoute,
        replica: int,
        row_id: int,
        last_variant_id: int | None,
    ) -> None:
        self.manager = manager
        self.engine = engine
        self.replica = replica
        self.key: Key = (engine.id, replica)
        self.row_id = row_id
        self.label = f"{engine.name}#{replica}"
        self.state: str = State.STOPPED
        self.variant: VariantConfig | None = None
        self.last_variant_id = last_variant_id
        self.process: EngineProcess | None = None
        self.in_flight = 0
        self.waiting: dict[int, list[float]] = {}  # variant id -> arrival times
        self.remote_request: tuple[int, float] | None = None  # (variant id, seen at)
        self.remote_in_flight = 0
        # After serving another process's request, keep its variant this long: that
        # process polls for it and must get its turn before the next swap.
        self.remote_hold_until = 0.0
        self.action = ""  # start / stop / restart from the admin, or "idle"
        self.swap: Swap | None = None
        # Variant id -> when its last start failed, and why: requests that were already
        # waiting for it get that error instead of triggering another attempt.
        self.failures: dict[int, tuple[float, EngineStartError]] = {}
        self.closing = False  # set while the row is closed to new requests before a launch
        self.crashed = False
        self.crash_times: deque[float] = deque(maxlen=64)
        self.last_used = time.monotonic()
        self.last_error = ""
        self.dropped = False
        self.log = ProcessLog(
            Path(settings.ENGINE_LOG_DIR) / f"{engine.name}-{replica}.log",
            lines=settings.ENGINE_LOG_LINES,
        )
        self.events: deque[tuple[float, str, int | None]] = deque(maxlen=200)
        self.changed = Signal()  # state changed: waiting requests re-check
        self.wake = Signal()  # work for the driver
        self._publish_lock = asyncio.Lock()
        self._published_state = ""
        self._published_swap = False
        self._published_log = (-1, 0.0)
        self._driver: asyncio.Task | None = None

    # --- requests -------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    @property
    def queued(self) -> int:
        return sum(len(times) for times in self.waiting.values())

    def admits(self, variant_id: int, *, arrival: float = math.inf) -> bool:
        """Running `variant_id`, and no swap pending, or one pending for less than the
        grace, or one that started after this request began waiting (that request was
        woken by the swap that served it, and must not lose its turn to the next one)."""
        if self.closing or self.state not in (State.RUNNING, State.DRAINING) or not self.alive:
            return False
        if self.variant is None or self.variant.id != variant_id:
            return False
        swap = self.swap
        return swap is None or arrival < swap.since or time.monotonic() - swap.since < swap_grace()

    def _owed(self, swap: Swap) -> bool:
        """Requests for the running variant that waited since before `swap`: it drains
        them too, as if they were in flight (they are about to be)."""
        running = self.variant.id if self.variant else None
        return any(t < swap.since for t in self.waiting.get(running, ())) if running else False

    async def enter(self, variant_id: int) -> str:
        """Wait until this replica runs `variant_id` and admits us; count us in flight."""
        if self.admits(variant_id):
            return self._admit()
        arrival = time.monotonic()
        deadline = arrival + self.engine.acquire_timeout()
        self.waiting.setdefault(variant_id, []).append(arrival)
        try:
            while True:
                if self.dropped:
                    raise OwnershipLost
                if self.admits(variant_id, arrival=arrival):
                    return self._admit()
                failed_at, error = self.failures.get(variant_id, (0.0, None))
                if error is not None and failed_at >= arrival:
                    raise error  # the start this request waited for failed
                self.wake.fire()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise EngineStartError(
                        f"Engine {self.label} did not get ready for this request within "
                        f"{self.engine.acquire_timeout():g} s."
                    )
                await self.changed.wait(remaining)
        finally:
            times = self.waiting[variant_id]
            times.remove(arrival)
            if not times:
                del self.waiting[variant_id]

    def _admit(self) -> str:
        assert self.process is not None
        self.in_flight += 1
        self.last_used = time.monotonic()
        return self.process.base_url

    def leave(self) -> None:
        self.in_flight -= 1
        self.last_used = time.monotonic()
        if self.in_flight == 0:
            self.changed.fire()  # a drain may be waiting for this

    # --- the driver -------------------------------------------------------------------

    def start_driver(self) -> None:
        self._driver = asyncio.ensure_future(self._drive())

    async def stop_driver(self) -> None:
        driver, self._driver = self._driver, None
        if driver is not None:
            await finish(driver)

    async def _drive(self) -> None:
        while True:
            job = self._next_job()
            if job is None:
                await self.wake.wait()
                continue
            try:
                await job()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep driving: the next request may succeed
                logger.exception("engine %s: unexpected error", self.label)
                await self._fail(f"Unexpected error managing engine {self.label}: {exc!r}")

    def _next_job(self) -> Callable[[], Awaitable[None]] | None:
        if self.action:
            action, self.action = self.action, ""
            return partial(self._run_action, action)
        if self.crashed:
            self.crashed = False
            return self._recover_from_crash
        target = self.wanted_variant()
        if target is not None:
            return partial(self._swap_to, target, reason="request")
        return None

    def wanted_variant(self) -> int | None:
        """The variant, other than the one running, that has waited longest."""
        running = self.variant.id if self.variant and self.alive else None
        candidates = []
        for variant_id, times in self.waiting.items():
            failed_at = self.failures.get(variant_id, (0.0, None))[0]
            fresh = [t for t in times if t > failed_at]  # the others get the failure
            if variant_id != running and fresh:
                candidates.append((min(fresh), variant_id))
        if self.remote_request is not None and self.remote_request[0] != running:
            candidates.append((self.remote_request[1], self.remote_request[0]))
        return min(candidates)[1] if candidates else None

    async def _run_action(self, action: str) -> None:
        self.event(action, None)
        if action == "idle":
            if self.in_flight == 0 and not self.waiting and self.state == State.RUNNING:
                await self._swap_to(None, reason="idle")
        elif action == EngineInstance.Action.STOP:
            await self._swap_to(None, reason="stop")
        elif action == EngineInstance.Action.RESTART:
            target = await self._default_variant()
            if target is not None:
                await self._swap_to(target, reason="restart")
        elif action == EngineInstance.Action.START and not self.alive:
            target = await self._default_variant()
            if target is not None:
                await self._swap_to(target, reason="start")

    async def _default_variant(self) -> int | None:
        """For admin actions: what runs, else what was asked for or ran last, else the first."""
        if self.variant is not None:
            return self.variant.id
        if self.remote_request is not None:
            return self.remote_request[0]
        return self.last_variant_id or await _first_variant_id(self.engine.id)

    async def _recover_from_crash(self) -> None:
        if self.alive and self.state == State.RUNNING:
            return  # a swap already replaced the crashed process
        now = time.monotonic()
        window = settings.ENGINE_CRASH_LOOP_WINDOW_SECONDS
        crashes = sum(1 for t in self.crash_times if now - t <= window)
        if crashes > settings.ENGINE_CRASH_LOOP_LIMIT:
            await self._stop_process()
            await self._fail(
                f"{self.last_error} It crashed {crashes} times within {window:g} s, so it "
                f"is not restarted until the next request. Last log lines:\n{self.log.tail(30)}"
            )
            return
        target = self.wanted_variant() or (self.variant.id if self.variant else None)
        if target is None:
            return
        backoff = settings.ENGINE_RESTART_BACKOFF_SECONDS * 2 ** max(crashes - 1, 0)
        await self._swap_to(target, reason="crash", delay=min(backoff, 30.0))

    async def _swap_to(self, target: int | None, *, reason: str, delay: float = 0.0) -> None:
        swap = Swap(target=target, reason=reason)
        self.swap = swap
        self.event(f"swap:{reason}", target)
        self.changed.fire()
        try:
            if delay:
                await asyncio.sleep(delay)
            await self._close(swap)
            await self._stop_process()
            if target is None:
                self.state, self.variant = State.STOPPED, None
                await self.sync(force_log=True)  # how it stopped (SIGKILL?) shows at once
            else:
                await self._launch(target)
                await self._served_remote_request(target, ok=True)
        except Exception as exc:
            error = exc if isinstance(exc, EngineStartError) else self._unexpected(exc)
            if target is not None:
                self.failures[target] = (time.monotonic(), error)
            await self._fail(str(error), variant_id=target)
            await self._served_remote_request(target, ok=False)
        finally:
            self.closing = False
            swap.done = True
            self.swap = None
            self.changed.fire()

    def _unexpected(self, exc: Exception) -> EngineStartError:
        """Anything else that broke a swap (the database, the file system) fails its
        waiters the same way, instead of them retrying at once in a loop."""
        logger.exception("engine %s: unexpected error", self.label)
        return EngineStartError(f"Engine {self.label} could not be switched: {exc!r}")

    async def _close(self, swap: Swap) -> None:
        """Drain the running variant, then close the row to new requests (atomically: only
        once no other process has one in flight, unless the drain timed out)."""
        if self.alive and self.state == State.RUNNING:
            self.state = State.DRAINING
            await self.sync()
        deadline = swap.since + drain_timeout()
        while True:
            forced = time.monotonic() >= deadline or not self.alive
            drained = self.in_flight == 0 and not self._owed(swap)
            if forced or (drained and time.monotonic() >= self.remote_hold_until):
                self.closing = True
                async with self._publish_lock:
                    closed = await self.manager.control.close_for_launch(self.row_id, force=forced)
                if closed:
                    if forced and self.alive and (self.in_flight or self.remote_in_flight):
                        self.log.note("drain timed out; stopping with requests in flight")
                    self.state = State.STARTING  # (not admitting either)
                    self._published_state = State.STARTING
                self.closing = False
                if closed:
                    return
            await self.changed.wait(0.1)

    async def _stop_process(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            await process.stop(grace=self.engine.stop_grace_seconds)
            self.event("stopped", self.variant.id if self.variant else None)

    async def _launch(self, variant_id: int) -> None:
        self.engine, variant = await _variant(self.engine.id, variant_id)
        self.variant, self.last_variant_id, self.state = variant, variant_id, State.STARTING
        label = f"{self.label} ({variant.label})"
        spec = LaunchSpec(
            command_template=self.engine.command_template,
            port=free_port(),
            slots=self.engine.slots,
            ctx_size=variant.ctx_size,
            model_path=variant.model_path,
            extra_args=variant.extra_args,
        )
        try:
            argv = render_command(spec)
        except ValidationError as exc:
            raise EngineStartError(
                f"Engine {label} cannot be started: {' '.join(exc.messages)}"
            ) from None
        process = await EngineProcess.launch(
            argv=argv, port=spec.port, log=self.log, cwd=settings.BASE_DIR, label=label
        )
        self.process = process
        self.manager.launches += 1
        self.event("launch", variant_id)
        self.manager._spawn(self._watch(process))
        await self.sync()
        try:
            await process.wait_healthy(
                within=self.engine.startup_timeout_seconds, flavor=self.engine.flavor, label=label
            )
        except EngineStartError:
            await self._stop_process()
            raise
        self.state = State.RUNNING
        self.last_used = time.monotonic()
        self.event("running", variant_id)
        await self.sync()

    async def _served_remote_request(self, variant_id: int | None, *, ok: bool) -> None:
        if self.remote_request is not None and self.remote_request[0] == variant_id:
            self.remote_request = None
            if ok:
                self.remote_hold_until = time.monotonic() + 4 * FOLLOWER_POLL_MAX
            await self.manager.control.clear_request(self.row_id, variant_id=variant_id)

    async def _watch(self, process: EngineProcess) -> None:
        code = await process.wait()
        if process.stopping or process is not self.process or self.state == State.STARTING:
            return  # a deliberate stop, or a failed start (reported by the start itself)
        self.last_error = (
            f"Engine {self.label} ({self.variant.label if self.variant else '?'}) "
            f"exited unexpectedly with code {code}."
        )
        process.log.note(f"exited unexpectedly with code {code}")
        self.crash_times.append(time.monotonic())
        self.crashed = True
        self.event("crash", self.variant.id if self.variant else None)
        if self.state == State.RUNNING:
            self.state = State.STARTING  # restart pending
        self.wake.fire()
        self.changed.fire()
        await self.sync(force_log=True)

    async def _fail(self, message: str, *, variant_id: int | None = None) -> None:
        self.state, self.last_error = State.FAILED, message
        if variant_id is not None:
            self.last_variant_id = variant_id
        self.event("failed", variant_id)
        await self.sync(force_log=True, variant_id=variant_id)

    def event(self, kind: str, variant_id: int | None) -> None:
        self.events.append((time.monotonic(), kind, variant_id))

    # --- publishing -------------------------------------------------------------------

    async def sync(self, *, force_log: bool = False, variant_id: int | None = None) -> None:
        """Write the replica's current state to its row. The snapshot is taken under the
        lock, so a slow earlier write can never overwrite a newer state."""
        async with self._publish_lock:
            fields = self._state_fields(force_log=force_log, variant_id=variant_id)
            try:
                await self.manager.control.update(self.row_id, **fields)
            except Exception:
                logger.exception("engine %s: cannot publish its state", self.label)

    def _state_fields(self, *, force_log: bool, variant_id: int | None) -> dict[str, Any]:
        process = self.process if self.alive else None
        serving = self.state in (State.RUNNING, State.DRAINING)
        admissible = process is not None and serving and not self.closing
        fields: dict[str, Any] = {
            "state": self.state,
            "variant_id": variant_id or (self.variant.id if self.variant else None),
            "pid": process.pid if process else None,
            "port": process.port if process else None,
            "base_url": process.base_url if admissible else "",
            "command": process.argv if process else [],
            "started_at": datetime.fromtimestamp(process.started_at, UTC) if process else None,
            "in_flight": self.in_flight,
            "queued": self.queued,
            "last_error": self.last_error,
            "owner_pid": os.getpid(),
            "heartbeat_at": NOW,
        }
        if self.state != self._published_state:
            fields["state_changed_at"] = NOW
            self._published_state = self.state
        draining = self.state == State.DRAINING
        if draining != self._published_swap:
            fields["swap_since"] = NOW if draining else None
            self._published_swap = draining
        version, published_at = self._published_log
        now = time.monotonic()
        if self.log.version != version and (force_log or now - published_at > LOG_PUBLISH_SECONDS):
            fields["log_tail"] = self.log.tail()
            self._published_log = (self.log.version, now)
        return fields

    # --- the owner's tick -----------------------------------------------------------------

    async def tick(self) -> bool:
        """Pick up requests written on the row, stop when idle, publish; False when the
        engine is gone (deleted, or no longer managed)."""
        view = await self.manager.control.owner_view(self.row_id)
        if view is None or view.kind != Engine.Kind.MANAGED:
            return False
        self.remote_in_flight = view.remote_in_flight
        if view.requested_action:
            self.action = view.requested_action
            await self.manager.control.clear_request(self.row_id, action=view.requested_action)
        await self._note_remote_request(view.requested_variant_id)
        if self._idle_for(view.idle_ttl_seconds, view.remote_idle_seconds):
            self.action = "idle"
        if self.action or self.remote_request:
            self.wake.fire()
        await self.sync()
        return True

    async def _note_remote_request(self, variant_id: int | None) -> None:
        if variant_id is None:
            self.remote_request = None
        elif self.admits(variant_id) and self.swap is None:
            # Already served (the asker was admitted directly): forget it, or it would
            # later pull the replica back to this variant for nobody.
            self.remote_request = None
            await self.manager.control.clear_request(self.row_id, variant_id=variant_id)
        elif self.remote_request is None or self.remote_request[0] != variant_id:
            self.remote_request = (variant_id, time.monotonic())

    def _idle_for(self, ttl: int | None, remote_idle: float | None) -> bool:
        if not ttl or self.state != State.RUNNING or self.swap is not None or self.action:
            return False
        if self.in_flight or self.waiting or self.remote_request or self.remote_in_flight:
            return False
        idle = min(
            time.monotonic() - self.last_used, math.inf if remote_idle is None else remote_idle
        )
        return idle >= ttl

    @property
    def releasable(self) -> bool:
        """Nothing runs and nothing is asked: another process may own it from now on."""
        return (
            self.state in (State.STOPPED, State.FAILED)
            and self.process is None
            and self.swap is None
            and not (self.action or self.crashed or self.waiting or self.remote_request)
            and self.in_flight == 0
        )

    def status(self) -> dict[str, Any]:
        process = self.process if self.alive else None
        return {
            "engine_id": self.engine.id,
            "engine": self.engine.name,
            "replica": self.replica,
            "state": self.state,
            "variant_id": self.variant.id if self.variant else None,
            "variant": self.variant.label if self.variant else "",
            "pid": process.pid if process else None,
            "port": process.port if process else None,
            "base_url": process.base_url if process else "",
            "uptime_seconds": time.time() - process.started_at if process else None,
            "in_flight": self.in_flight + self.remote_in_flight,
            "queued": self.queued,
            "last_error": self.last_error,
            "log_tail": self.log.tail(),
        }


# --- leases ----------------------------------------------------------------------------


class ReplicaLease:
    """`async with` a replica running a variant; `.base_url` is where to send the request."""

    def __init__(self, manager: EngineManager, *, engine_id: int, variant_id: int, replica: int):
        self._manager = manager
        self.engine_id = engine_id
        self.variant_id = variant_id
        self.replica = replica
        self.base_url = ""
        self._release: Callable[[], None] | None = None

    async def __aenter__(self) -> ReplicaLease:
        self.base_url, self._release = await self._manager._enter(
            engine_id=self.engine_id, variant_id=self.variant_id, replica=self.replica
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()


# --- the manager -------------------------------------------------------------------------


class EngineManager:
    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.control = ControlConnection()
        self.launches = 0  # engine processes this manager started (tests, status)
        self._replicas: dict[Key, Replica] = {}
        self._claim_locks: dict[Key, asyncio.Lock] = {}
        self._background: set[asyncio.Task] = set()
        self._tick_task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._serving_urls: dict[tuple[int, ...], tuple[float, str | None]] = {}
        self._replica_variant_cache: dict[int, tuple[float, dict[int, int | None]]] = {}

    # --- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Start the owner loop (idempotent; the first acquire() does it too)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._loop is not None and self._loop.is_running():
                raise RuntimeError("EngineManager is bound to another running event loop.")
            self._abandon()  # a finished loop's connection and tasks are unusable
            self._loop = loop
        if self._tick_task is None or self._tick_task.done():
            self._tick_task = asyncio.ensure_future(self._run())

    def _abandon(self) -> None:
        """Forget everything from a previous event loop, killing the engines it launched
        (nothing could stop them any more; the advisory locks went with its connection)."""
        for replica in self._replicas.values():
            if replica.alive and replica.process is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(replica.process.pid, signal.SIGKILL)
        self._reset()

    async def shutdown(self) -> None:
        """Stop every engine process this process owns and give up ownership."""
        tick, self._tick_task = self._tick_task, None
        if tick is not None:
            await finish(tick)
        # In parallel: each may take its stop grace, and a server stop has a deadline.
        replicas = list(self._replicas.values())
        await asyncio.gather(
            *(self._give_up(replica, stop=True) for replica in replicas), return_exceptions=True
        )
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await self.control.close()
        self._loop = None

    # --- requests ---------------------------------------------------------------------

    def acquire(self, *, engine_id: int, variant_id: int, replica: int = 0) -> ReplicaLease:
        return ReplicaLease(self, engine_id=engine_id, variant_id=variant_id, replica=replica)

    async def _enter(
        self, *, engine_id: int, variant_id: int, replica: int
    ) -> tuple[str, Callable[[], None]]:
        try:
            return await self._enter_or_wait(
                engine_id=engine_id, variant_id=variant_id, replica=replica
            )
        except psycopg.Error as exc:  # the pipeline answers EngineStartError with a 503
            raise EngineStartError(f"Engine {engine_id} is unavailable: {exc}") from exc

    async def _enter_or_wait(
        self, *, engine_id: int, variant_id: int, replica: int
    ) -> tuple[str, Callable[[], None]]:
        await self.start()
        key = (engine_id, replica)
        follower: Follower | None = None
        while True:
            owned = self._replicas.get(key)
            if owned is not None:
                with contextlib.suppress(OwnershipLost):
                    return await owned.enter(variant_id), owned.leave
                continue
            admission = await self._admit_remote(key, variant_id)
            if admission is not None:
                return admission.base_url, partial(self._leave_remote, key, admission)
            if follower is not None:
                await follower.check()  # the owner's failure for our variant wins over a retry
            if await self._claim(key) is not None:
                continue
            follower = follower or await Follower.create(self, key, variant_id)
            await follower.pause()

    async def _admit_remote(self, key: Key, variant_id: int) -> Admission | None:
        return await self.control.admit_remote(
            engine_id=key[0],
            replica=key[1],
            variant_id=variant_id,
            grace=swap_grace(),
            stale=owner_stale_after(),
        )

    def _leave_remote(self, key: Key, admission: Admission) -> None:
        # A task, so a cancelled request still gives its place back.
        self._spawn(
            self.control.release_remote(
                engine_id=key[0], replica=key[1], generation=admission.generation
            )
        )

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- ownership ----------------------------------------------------------------------

    async def _claim(self, key: Key) -> Replica | None:
        """Become the replica's owner if nobody is; None if another process is."""
        lock = self._claim_locks.setdefault(key, asyncio.Lock())
        async with lock:
            if key in self._replicas:
                return self._replicas[key]
            lock_id = lock_key(engine_id=key[0], replica=key[1])
            if not await self.control.try_lock(lock_id):
                return None  # another process owns it (the cheap, common answer)
            try:
                engine, row_id, last_variant = await _engine_row(*key)
                await self._kill_previous_process(row_id, engine)
                await self.control.claim(
                    row_id, owner_pid=os.getpid(), owner_host=socket.gethostname()
                )
            except BaseException:
                await self.control.unlock(lock_id)
                raise
            replica = Replica(
                manager=self,
                engine=engine,
                replica=key[1],
                row_id=row_id,
                last_variant_id=last_variant,
            )
            self._replicas[key] = replica
            replica.start_driver()
            logger.info("engine %s: owned by process %s", replica.label, os.getpid())
            return replica

    async def _kill_previous_process(self, row_id: int, engine: EngineRoute) -> None:
        pid, argv, started_at, _ = await self.control.orphan(row_id)
        if pid and argv:
            killed = await asyncio.to_thread(
                _kill_orphan, pid, argv, started_at, engine.stop_grace_seconds
            )
            if killed:
                logger.warning(
                    "engine %s: stopped pid %s left by its previous owner", engine.name, pid
                )

    async def _give_up(self, replica: Replica, *, stop: bool) -> None:
        """Stop owning the replica (stopping its process first if asked). Shielded: a
        cancelled caller (the tick, at shutdown) must not leave a process or lock behind."""
        task = asyncio.ensure_future(self._give_up_now(replica, stop=stop))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        await asyncio.shield(task)

    async def _give_up_now(self, replica: Replica, *, stop: bool) -> None:
        lock = self._claim_locks.setdefault(replica.key, asyncio.Lock())
        async with lock:
            self._replicas.pop(replica.key, None)
            replica.dropped = True
            replica.changed.fire()
            await replica.stop_driver()
            if stop and replica.process is not None:
                await replica._stop_process()
                replica.state, replica.variant = State.STOPPED, None
            await self.control.update(
                replica.row_id,
                state=replica.state,
                pid=None,
                port=None,
                base_url="",
                in_flight=0,
                queued=0,
                owner_pid=None,
                owner_host="",
                swap_since=None,
                log_tail=replica.log.tail(),
                state_changed_at=NOW,
            )
            await self.control.unlock(lock_key(engine_id=replica.key[0], replica=replica.key[1]))
            replica.log.close()

    # --- the owner loop -------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("engine manager tick failed")
                if not self.control.connected:
                    await self._lost_connection()
            await asyncio.sleep(poll_interval())

    async def _tick(self) -> None:
        await self.control.ping()
        for replica in list(self._replicas.values()):
            if not await replica.tick():
                await self._give_up(replica, stop=True)
            elif replica.releasable:
                await self._give_up(replica, stop=False)
        for key in await self.control.pending_elsewhere(stale_seconds=owner_stale_after()):
            if key not in self._replicas:
                await self._claim_pending(key)

    async def _claim_pending(self, key: Key) -> None:
        """Take over a replica someone asked for (admin action, variant) or whose owner died."""
        try:
            replica = await self._claim(key)
        except EngineStartError:
            return  # engine deleted, no longer managed or fewer replicas: nothing to own
        if replica is not None and not await replica.tick():
            await self._give_up(replica, stop=True)

    async def _lost_connection(self) -> None:
        """Without our connection we no longer hold the locks: another process may take
        over at any moment, so our engine processes must go."""
        for replica in list(self._replicas.values()):
            self._replicas.pop(replica.key, None)
            replica.dropped = True
            replica.changed.fire()
            await replica.stop_driver()
            with contextlib.suppress(Exception):
                await replica._stop_process()
        await self.control.close()

    # --- observation --------------------------------------------------------------------

    def status(self) -> list[dict[str, Any]]:
        """The replicas this process owns, as the admin shows them (see selectors for all)."""
        return [replica.status() for replica in self._replicas.values()]

    def replica(self, *, engine_id: int, replica: int = 0) -> Replica | None:
        return self._replicas.get((engine_id, replica))

    async def replica_order(
        self, *, engine_id: int, variant_id: int, replicas: int
    ) -> tuple[int, ...]:
        """Replicas to place a new request for `variant_id` on, best first: those running
        it, then those running nothing; the ones running another variant are left out
        (the scheduler takes them by load only if nothing else is free). What other
        processes run is read at most every SERVING_URL_CACHE_SECONDS."""
        running = await self._replica_variants(engine_id)
        for (engine, replica), owned in self._replicas.items():
            if engine == engine_id:
                serving = owned.alive and owned.state in (State.RUNNING, State.DRAINING)
                running[replica] = owned.variant.id if serving and owned.variant else None
        same = [r for r in range(replicas) if running.get(r) == variant_id]
        idle = [r for r in range(replicas) if running.get(r) is None]
        return tuple(same + idle)

    async def _replica_variants(self, engine_id: int) -> dict[int, int | None]:
        now = time.monotonic()
        cached = self._replica_variant_cache.get(engine_id)
        if cached is not None and now - cached[0] < SERVING_URL_CACHE_SECONDS:
            return dict(cached[1])
        await self.start()
        variants = await self.control.replica_variants(
            engine_id=engine_id, stale=owner_stale_after()
        )
        self._replica_variant_cache[engine_id] = (now, variants)
        return dict(variants)

    async def serving_url(self, *, variant_ids: tuple[int, ...]) -> str | None:
        """The root of a process, owned here or elsewhere, that runs one of `variant_ids`
        and admits requests; None if none does (nothing is started to find out). What
        other processes run is read at most every SERVING_URL_CACHE_SECONDS."""
        for replica in self._replicas.values():
            process, variant = replica.process, replica.variant
            serving = replica.state in (State.RUNNING, State.DRAINING) and replica.alive
            if serving and process and variant and variant.id in variant_ids:
                return process.base_url
        now = time.monotonic()
        cached = self._serving_urls.get(variant_ids)
        if cached is not None and now - cached[0] < SERVING_URL_CACHE_SECONDS:
            return cached[1]
        await self.start()
        url = await self.control.serving_url(
            variant_ids=list(variant_ids), stale=owner_stale_after()
        )
        self._serving_urls[variant_ids] = (now, url)
        return url


class Follower:
    """A request in a process that does not own the replica: it asks the owner (through
    the row) for its variant and polls until it is admitted, takes ownership over, or the
    owner reports that starting that variant failed."""

    def __init__(self, manager: EngineManager, key: Key, variant_id: int, timeout: float) -> None:
        self.manager = manager
        self.key = key
        self.variant_id = variant_id
        self.deadline = time.monotonic() + timeout
        self.generation: int | None = None
        self.interval = 0.1

    @classmethod
    async def create(cls, manager: EngineManager, key: Key, variant_id: int) -> Follower:
        engine, _, _ = await _engine_row(*key)
        follower = cls(manager, key, variant_id, engine.acquire_timeout())
        await follower.check()
        return follower

    async def check(self) -> None:
        """Raise if starting our variant failed since we asked, or we waited too long;
        ask the owner for our variant when nobody else's request is pending."""
        control = self.manager.control
        stale = owner_stale_after()
        row = await control.row_view(engine_id=self.key[0], replica=self.key[1], stale=stale)
        if row is not None:
            if self.generation is None:
                self.generation = row.generation
            failed_since_asked = row.state == State.FAILED and row.generation > self.generation
            if failed_since_asked and row.variant_id == self.variant_id:
                raise EngineStartError(row.last_error or f"Engine {self.key[0]} failed to start.")
            serving = row.variant_id == self.variant_id and row.state == State.STARTING
            if row.requested_variant_id is None and not serving:
                await control.request_variant(
                    engine_id=self.key[0], replica=self.key[1], variant_id=self.variant_id
                )
        if time.monotonic() >= self.deadline:
            raise EngineStartError(
                f"Engine {self.key[0]} replica {self.key[1]} did not get ready for this "
                "request in time (it is owned by another gateway process)."
            )

    async def pause(self) -> None:
        await asyncio.sleep(self.interval)
        self.interval = min(self.interval * 1.5, FOLLOWER_POLL_MAX)


engine_manager = EngineManager()
