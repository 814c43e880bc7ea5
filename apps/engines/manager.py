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
killing the previous owner's engine process if it is still running. If the manager's own
connection is lost, its locks go with it: a tick that finds it broken stops the engines at
once; a reconnect made by some other statement first is seen on the next tick, which
takes back the locks nobody took meanwhile (the engines keep running) and stops the rest.

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

Here: the manager (ownership, the owner's tick, leases, followers in other processes).
One replica's driver is replica.py; its row publishing replica_publish.py; settings and
launch configuration replica_config.py; its wake-ups replica_events.py; killing a dead
owner's engine process orphans.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import psycopg

from apps.engines.engine_process import EngineStartError
from apps.engines.instance_store import NOW, Admission, ControlConnection, lock_key
from apps.engines.models import EngineInstance
from apps.engines.orphans import kill_orphan
from apps.engines.registry import EngineRoute
from apps.engines.replica import Key, OwnershipLost, Replica
from apps.engines.replica_config import (
    FOLLOWER_POLL_MAX,
    engine_row,
    owner_stale_after,
    poll_interval,
    swap_grace,
)
from apps.engines.replica_events import finish

__all__ = ["EngineManager", "EngineStartError", "ReplicaLease", "engine_manager"]

logger = logging.getLogger(__name__)

State = EngineInstance.State
SERVING_URL_CACHE_SECONDS = 1.0


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
        self.base_url, self._release = await self._manager.enter(
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
        self._dropped: dict[Key, Replica] = {}  # stopped with the lock lost; rows not tidied
        self._locks_checked_epoch = 0
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

    async def enter(
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
        self.spawn(
            self.control.release_remote(
                engine_id=key[0], replica=key[1], generation=admission.generation
            )
        )

    def spawn(self, coro: Awaitable[Any]) -> None:
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
            epoch = self.control.epoch  # the connection that holds the lock
            self._dropped.pop(key, None)  # its row is ours again: claim() rewrites it
            try:
                engine, row_id, last_variant = await engine_row(*key)
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
                lock_epoch=epoch,
            )
            self._replicas[key] = replica
            replica.start_driver()
            logger.info("engine %s: owned by process %s", replica.label, os.getpid())
            return replica

    async def _kill_previous_process(self, row_id: int, engine: EngineRoute) -> None:
        pid, argv, started_at, _ = await self.control.orphan(row_id)
        if pid and argv:
            killed = await asyncio.to_thread(
                kill_orphan, pid, argv, started_at, engine.stop_grace_seconds
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
                await replica.stop_process()
                replica.state, replica.variant = State.STOPPED, None
            await self._release(replica)

    async def _release(self, replica: Replica) -> None:
        """Write the replica's row as nobody's, with nothing running, and unlock it."""
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
        epoch = self.control.epoch
        if epoch != self._locks_checked_epoch:
            await self._retake_locks()
            self._locks_checked_epoch = epoch
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

    # --- a lost database connection ----------------------------------------------------

    async def _lost_connection(self) -> None:
        replicas = list(self._replicas.values())
        await self._drop(replicas)
        # Their rows still advertise them until we hold their locks again (_retake_locks).
        self._dropped.update((replica.key, replica) for replica in replicas)
        await self.control.close()

    async def _drop(self, replicas: list[Replica]) -> None:
        """Without the connection that took their locks we no longer own these replicas:
        another process may take over at any moment, so their engine processes must go."""
        for replica in replicas:
            logger.warning(
                "engine %s: the database connection holding its lock was lost; stopping "
                "its engine (another process may own it now)",
                replica.label,
            )
            self._replicas.pop(replica.key, None)
            replica.dropped = True
            replica.changed.fire()
            await replica.stop_driver()
            with contextlib.suppress(Exception):
                await replica.stop_process()
            replica.state, replica.variant = State.STOPPED, None

    async def _retake_locks(self) -> None:
        """After a reconnect (any statement reconnects a lost connection, and the locks
        went with the old one): keep the replicas nobody took meanwhile, stop the others
        (their rows are their new owners'), and write the rows of those dropped with the
        lost connection as stopped, so nobody is sent to them."""
        epoch = self.control.epoch
        for replica in [r for r in self._replicas.values() if r.lock_epoch != epoch]:
            if await self._retake(replica):
                replica.lock_epoch = self.control.epoch  # the connection that took it
            else:
                await self._drop([replica])
        for key in list(self._dropped):
            async with self._claim_locks.setdefault(key, asyncio.Lock()):
                replica = self._dropped.pop(key, None)
                if (
                    replica is not None
                    and key not in self._replicas
                    and await self._retake(replica)
                ):
                    await self._release(replica)

    async def _retake(self, replica: Replica) -> bool:
        """Hold the replica's lock again if nobody owned the replica since; else hold none."""
        lock_id = lock_key(engine_id=replica.key[0], replica=replica.key[1])
        if not await self.control.try_lock(lock_id):
            return False
        if await self.control.owner(replica.row_id) == (os.getpid(), socket.gethostname()):
            return True
        await self.control.unlock(lock_id)
        return False

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
        engine, _, _ = await engine_row(*key)
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
