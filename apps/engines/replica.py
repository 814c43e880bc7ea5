"""One replica of a managed engine, as its owning gateway process runs it.

Its driver task alone launches, swaps and stops the engine process; requests (`enter`),
the crash watcher and the owner's tick (`tick`) only change flags and wake it. See
manager.py for ownership, swaps and crash restarts as a whole.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.core.exceptions import ValidationError

from apps.engines.engine_process import EngineProcess, EngineStartError, ProcessLog, free_port
from apps.engines.launch import LaunchSpec, render_command
from apps.engines.models import Engine, EngineInstance
from apps.engines.registry import EngineRoute
from apps.engines.replica_config import (
    FOLLOWER_POLL_MAX,
    VariantConfig,
    drain_timeout,
    first_variant_id,
    swap_grace,
    variant_config,
)
from apps.engines.replica_events import OwnershipLost, Signal, Swap, finish
from apps.engines.replica_publish import ReplicaPublisher
from apps.observability import metrics

if TYPE_CHECKING:
    from apps.engines.manager import EngineManager

logger = logging.getLogger(__name__)

State = EngineInstance.State
Key = tuple[int, int]  # (engine id, replica)


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
        lock_epoch: int,
    ) -> None:
        self.manager = manager
        self.lock_epoch = lock_epoch  # the control connection's epoch that holds our lock
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
        self.launched_at: float | None = None  # monotonic, while a launch is loading
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
        self.publisher = ReplicaPublisher(manager.control, row_id)
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
        return self.last_variant_id or await first_variant_id(self.engine.id)

    async def _recover_from_crash(self) -> None:
        if self.alive and self.state == State.RUNNING:
            return  # a swap already replaced the crashed process
        now = time.monotonic()
        window = settings.ENGINE_CRASH_LOOP_WINDOW_SECONDS
        crashes = sum(1 for t in self.crash_times if now - t <= window)
        if crashes > settings.ENGINE_CRASH_LOOP_LIMIT:
            await self.stop_process()
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
            await self.stop_process()
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
                closed = await self.publisher.close_for_launch(force=forced)
                if closed:
                    if forced and self.alive and (self.in_flight or self.remote_in_flight):
                        self.log.note("drain timed out; stopping with requests in flight")
                    self.state = State.STARTING  # (not admitting either)
                self.closing = False
                if closed:
                    return
            await self.changed.wait(0.1)

    async def stop_process(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            await process.stop(grace=self.engine.stop_grace_seconds)
            self.event("stopped", self.variant.id if self.variant else None)

    async def _launch(self, variant_id: int) -> None:
        self.engine, variant = await variant_config(self.engine.id, variant_id)
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
        self.manager.spawn(self._watch(process))
        await self.sync()
        try:
            await process.wait_healthy(
                within=self.engine.startup_timeout_seconds, flavor=self.engine.flavor, label=label
            )
        except EngineStartError:
            await self.stop_process()
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
        now = time.monotonic()
        self.events.append((now, kind, variant_id))
        self._measure(kind, now)

    def _measure(self, kind: str, now: float) -> None:
        """Starts, swaps, crashes and load times for the Prometheus metrics."""
        name = self.engine.name
        if kind == "launch":
            metrics.ENGINE_STARTS.labels(name).inc()
            self.launched_at = now
        elif kind == "running" and self.launched_at is not None:
            metrics.ENGINE_LOAD.labels(name).observe(now - self.launched_at)
            self.launched_at = None
        elif kind == "crash":
            metrics.ENGINE_CRASHES.labels(name).inc()
        elif kind.startswith("swap:"):
            metrics.ENGINE_SWAPS.labels(name, kind.removeprefix("swap:")).inc()

    # --- publishing -------------------------------------------------------------------

    async def sync(self, *, force_log: bool = False, variant_id: int | None = None) -> None:
        """Write the replica's current state to its row (ReplicaPublisher)."""
        await self.publisher.publish(self, force_log=force_log, variant_id=variant_id)

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
