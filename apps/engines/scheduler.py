"""Per-engine slot scheduling (pipeline step 10): fair across tenants, sticky per session.

An engine has `replicas` processes, each with `slots` concurrent requests (llama.cpp's
slots). A request holds one (replica, slot) for as long as the engine works on it:

    request = SlotRequest(engine_key, replicas=2, slots=4, tenant="acme", max_queue=100,
                          max_wait=30.0, session=session_id)
    async with scheduler.slot(request) as placement:
        ...  # send to replica `placement.replica` with `"id_slot": placement.slot`

Fairness is start-time fair queueing: each tenant has a virtual finish time that grows by
1/weight per granted request, never lagging the engine's virtual clock (so idle time is not
banked as credit). A freed slot goes to the waiting tenant with the smallest
max(clock, finish), FIFO within a tenant; a newcomer starts at the clock, so it is served
before any tenant that already got a grant at this clock: within one grant per waiting tenant.

Stickiness: a session's last (replica, slot) is remembered (bounded LRU), so llama.cpp's
prompt cache for that conversation is reused. If that slot is busy, a request that says the
cache is worth waiting for (`insist`: its session's history is long) insists on it for
`sticky_wait` seconds, then takes any free slot (same replica first) and remembers it; one
that does not takes another free slot at once, since recomputing a short prompt costs less
than waiting for someone else's answer.

Pure asyncio and per process: each gateway worker schedules its own requests. An
uncontended acquire never suspends and creates no task or timer.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

Slot = tuple[int, int]  # (replica, slot)

DEFAULT_STICKY_WAIT = 0.5
DEFAULT_MAX_SESSIONS = 100_000
# Before the first release there is no measured hold time; assume one second per request.
DEFAULT_HOLD_SECONDS = 1.0
HOLD_SMOOTHING = 0.2  # weight of the latest hold time in the moving average
MAX_RETRY_AFTER = 300


class SchedulerBusy(Exception):
    """The engine's queue is full, or a request waited longer than `max_wait` (HTTP 503)."""

    def __init__(self, engine_key: str, retry_after: int, reason: str) -> None:
        super().__init__(f"Engine `{engine_key}` is busy ({reason}); retry after {retry_after} s.")
        self.engine_key = engine_key
        self.retry_after = retry_after  # whole seconds, >= 1: the Retry-After header
        self.reason = reason  # "queue_full" or "wait_timeout"


@dataclass(frozen=True, slots=True)
class SlotRequest:
    """What a request asks of an engine's scheduler.

    `insist`: wait up to the scheduler's `sticky_wait` for the session's remembered slot
    if it is busy (its prompt cache is worth it), rather than take another free slot at
    once. `replica_order`: replicas to place a request without a remembered slot on
    first, best first, while they have a free slot (e.g. those already running the
    variant the request needs, so a managed engine is not swapped needlessly); the others
    are chosen by load."""

    engine_key: str
    replicas: int
    slots: int
    tenant: str
    max_queue: int
    max_wait: float
    weight: int = 1
    session: str | None = None
    insist: bool = True
    replica_order: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.replicas < 1 or self.slots < 1:
            raise ValueError(f"replicas and slots must be >= 1 (got {self.replicas}, {self.slots})")
        if self.weight <= 0:
            raise ValueError(f"weight must be > 0 (got {self.weight})")

    def as_message(self) -> dict[str, Any]:
        """As JSON for the host-wide scheduler service (from_message reads it back)."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> SlotRequest:
        return cls(**{**message, "replica_order": tuple(message["replica_order"])})


@dataclass(frozen=True, slots=True)
class Placement:
    engine_key: str
    replica: int
    slot: int  # llama.cpp `id_slot`, 0..slots-1
    waited: float  # seconds spent queued; 0.0 when granted at once
    sticky: bool  # a session got back the slot it had last time
    granted_at: float = field(repr=False)  # time.monotonic(), for the hold-time average


@dataclass(eq=False, slots=True)
class _Tenant:
    name: str
    weight: int
    finish: float = 0.0  # virtual time at which the service granted so far ends
    queue: deque[_Waiter] = field(default_factory=deque)
    with_preference: int = 0  # waiters in `queue` that remember a slot
    granted: int = 0


@dataclass(eq=False, slots=True)
class _Waiter:
    tenant: _Tenant
    seq: int  # arrival order across the engine, the tie-breaker between tenants
    preferred: Slot | None
    strict: bool  # only `preferred` will do (during the sticky wait)
    replica_order: tuple[int, ...]  # replicas to try first, best first (see Scheduler.slot)
    enqueued_at: float
    future: asyncio.Future[None]
    queued: bool = True
    granted: Slot | None = None


class _Engine:
    """Slots, queues and counters of one engine; all methods are synchronous."""

    def __init__(self, key: str, replicas: int, slots: int) -> None:
        self.key = key
        self.replicas = 0
        self.slots = 0
        # Sized to the largest capacity seen: requests on slots removed by a resize drain there.
        self.busy: list[list[bool]] = []
        self.in_flight: list[int] = []
        self.free_by_replica: list[int] = []
        self.granted_by_replica: list[int] = []
        self.free = 0
        self.tenants: dict[str, _Tenant] = {}
        self.backlogged: dict[str, _Tenant] = {}  # tenants with waiters
        self.waiting = 0
        self.clock = 0.0  # virtual time: the start tag of the latest grant
        self.seq = 0
        self.granted = 0
        self.granted_after_wait = 0
        self.wait_total = 0.0
        self.wait_max = 0.0
        self.avg_hold: float | None = None
        self.rejected_queue_full = 0
        self.rejected_wait_timeout = 0
        self.cancelled_waiting = 0
        self.sticky_hits = 0
        self.sticky_moves = 0
        self.resize(replicas, slots)

    # -- capacity ---------------------------------------------------------------------------

    def resize(self, replicas: int, slots: int) -> None:
        """Follow the operator's replicas/slots; arrays only grow, so releases stay valid."""
        while len(self.busy) < replicas:
            self.busy.append([])
            for counters in (
                self.in_flight,
                self.free_by_replica,
                self.granted_by_replica,
            ):
                counters.append(0)
        for row in self.busy:
            row.extend([False] * (slots - len(row)))
        self.replicas, self.slots = replicas, slots
        self.free_by_replica = [
            sum(not busy for busy in row[:slots]) if r < replicas else 0
            for r, row in enumerate(self.busy)
        ]
        self.free = sum(self.free_by_replica)

    def valid(self, slot: Slot | None) -> Slot | None:
        """A remembered slot, unless a resize removed it."""
        if slot is None or slot[0] >= self.replicas or slot[1] >= self.slots:
            return None
        return slot

    def is_free(self, slot: Slot) -> bool:
        return self.valid(slot) is not None and not self.busy[slot[0]][slot[1]]

    def find_slot(
        self, preferred: Slot | None, strict: bool, replica_order: tuple[int, ...] = ()
    ) -> Slot | None:
        """The remembered slot, else a free one on its replica, else (unless strict) the
        first replica of `replica_order` with a free slot, else the least loaded."""
        preferred = self.valid(preferred)
        if preferred is not None:
            if not self.busy[preferred[0]][preferred[1]]:
                return preferred
            if strict:
                return None
            if self.free_by_replica[preferred[0]]:
                return preferred[0], self._lowest_free(preferred[0])
        if not self.free:
            return None
        if self.replicas == 1:  # the common case, on every request: no choice to make
            return 0, self._lowest_free(0)
        for replica in replica_order:
            if 0 <= replica < self.replicas and self.free_by_replica[replica]:
                return replica, self._lowest_free(replica)
        replica = min(
            (r for r in range(self.replicas) if self.free_by_replica[r]),
            key=self.in_flight.__getitem__,  # min() keeps the lowest index on ties
        )
        return replica, self._lowest_free(replica)

    def _lowest_free(self, replica: int) -> int:
        return self.busy[replica].index(False, 0, self.slots)

    def occupy(self, slot: Slot, tenant: _Tenant, waited: float) -> None:
        replica, index = slot
        self.busy[replica][index] = True
        self.in_flight[replica] += 1
        self.free_by_replica[replica] -= 1
        self.free -= 1
        self.granted_by_replica[replica] += 1
        self.granted += 1
        tenant.granted += 1
        if waited:
            self.granted_after_wait += 1
            self.wait_total += waited
            self.wait_max = max(self.wait_max, waited)
        self._charge(tenant)

    def _charge(self, tenant: _Tenant) -> None:
        start = max(self.clock, tenant.finish)
        tenant.finish = start + 1.0 / tenant.weight
        self.clock = start

    def vacate(self, slot: Slot, held: float | None) -> None:
        replica, index = slot
        self.busy[replica][index] = False
        self.in_flight[replica] -= 1
        if self.valid(slot) is not None:
            self.free_by_replica[replica] += 1
            self.free += 1
        if held is not None:
            previous = self.avg_hold
            self.avg_hold = (
                held if previous is None else previous + HOLD_SMOOTHING * (held - previous)
            )
        self.dispatch()

    # -- queue ------------------------------------------------------------------------------

    def tenant(self, name: str, weight: int) -> _Tenant:
        tenant = self.tenants.get(name)
        if tenant is None:
            tenant = self.tenants[name] = _Tenant(name, weight)
        else:
            tenant.weight = weight  # the latest configured weight applies
        return tenant

    def enqueue(
        self,
        tenant: _Tenant,
        preferred: Slot | None,
        strict: bool,
        future: asyncio.Future[None],
        replica_order: tuple[int, ...] = (),
    ) -> _Waiter:
        self.seq += 1
        waiter = _Waiter(
            tenant, self.seq, preferred, strict, replica_order, time.monotonic(), future
        )
        if not tenant.queue:
            self.backlogged[tenant.name] = tenant
        tenant.queue.append(waiter)
        tenant.with_preference += preferred is not None
        self.waiting += 1
        return waiter

    def leave(self, waiter: _Waiter) -> None:
        if not waiter.queued:
            return
        waiter.queued = False
        tenant = waiter.tenant
        if tenant.queue[0] is waiter:  # the usual case: served or timed out in order
            tenant.queue.popleft()
        else:
            tenant.queue.remove(waiter)
        tenant.with_preference -= waiter.preferred is not None
        if not tenant.queue:
            del self.backlogged[tenant.name]
        self.waiting -= 1

    def abandon(self, waiter: _Waiter) -> None:
        """A cancelled waiter: give back a slot granted meanwhile, or leave the queue."""
        self.cancelled_waiting += 1
        if waiter.granted is not None:
            self.vacate(waiter.granted, held=None)
        else:
            self.leave(waiter)

    def dispatch(self) -> None:
        """Hand free slots to waiters, in fair order, while someone can take one."""
        while self.free and self.waiting and self._grant_next():
            pass

    def _grant_next(self) -> bool:
        clock = self.clock
        order = sorted(
            self.backlogged.values(),
            key=lambda tenant: (max(clock, tenant.finish), tenant.queue[0].seq),
        )
        # A tenant whose waiters all insist on busy slots passes its turn to the next one.
        for tenant in order:
            match = self._match(tenant)
            if match is not None:
                waiter, slot = match
                self.leave(waiter)
                self.occupy(slot, tenant, time.monotonic() - waiter.enqueued_at)
                waiter.granted = slot
                if not waiter.future.done():
                    waiter.future.set_result(None)
                return True
        return False

    def _match(self, tenant: _Tenant) -> tuple[_Waiter, Slot] | None:
        # A waiter whose own slot is free goes first (its prompt cache is there); this only
        # reorders within the tenant, so fairness between tenants is unchanged.
        if tenant.with_preference:
            for waiter in tenant.queue:
                if waiter.preferred is not None and self.is_free(waiter.preferred):
                    return waiter, waiter.preferred
        for waiter in tenant.queue:
            slot = self.find_slot(waiter.preferred, waiter.strict, waiter.replica_order)
            if slot is not None:
                return waiter, slot
        return None

    # -- reporting --------------------------------------------------------------------------

    def retry_after(self) -> int:
        """Seconds until a slot is likely free for one more request at the back of the queue."""
        hold = DEFAULT_HOLD_SECONDS if self.avg_hold is None else self.avg_hold
        capacity = max(1, self.replicas * self.slots)
        estimate = math.ceil(hold * (self.waiting + 1) / capacity)
        return max(1, min(MAX_RETRY_AFTER, estimate))

    def stats(self) -> dict[str, Any]:
        return {
            "engine": self.key,
            "replicas": self.replicas,
            "slots": self.slots,
            "capacity": self.replicas * self.slots,
            "in_flight": sum(self.in_flight),
            "queued": self.waiting,
            "queued_by_tenant": {name: len(t.queue) for name, t in self.backlogged.items()},
            "granted": self.granted,
            "granted_after_wait": self.granted_after_wait,
            "granted_by_tenant": {name: t.granted for name, t in self.tenants.items()},
            "avg_wait_seconds": self.wait_total / self.granted if self.granted else 0.0,
            "max_wait_seconds": self.wait_max,
            "avg_hold_seconds": self.avg_hold,
            "rejected_queue_full": self.rejected_queue_full,
            "rejected_wait_timeout": self.rejected_wait_timeout,
            "cancelled_waiting": self.cancelled_waiting,
            "sticky_hits": self.sticky_hits,
            "sticky_moves": self.sticky_moves,
            "per_replica": [self._replica_stats(r) for r in range(len(self.busy))],
        }

    def _replica_stats(self, replica: int) -> dict[str, Any]:
        return {
            "replica": replica,
            "in_flight": self.in_flight[replica],
            "busy_slots": [i for i, busy in enumerate(self.busy[replica]) if busy],
            "granted": self.granted_by_replica[replica],
        }


class _Lease:
    """`async with scheduler.slot(...)`: acquire on enter, release on exit (whatever happens)."""

    __slots__ = ("_request", "_scheduler", "placement")

    def __init__(self, scheduler: Scheduler, request: SlotRequest) -> None:
        self._scheduler = scheduler
        self._request = request
        self.placement: Placement | None = None

    async def __aenter__(self) -> Placement:
        self.placement = await self._scheduler.acquire(self._request)
        return self.placement

    async def __aexit__(self, *exc_info: object) -> None:
        placement, self.placement = self.placement, None
        if placement is not None:
            self._scheduler.release(placement)


class Scheduler:
    def __init__(
        self,
        *,
        sticky_wait: float = DEFAULT_STICKY_WAIT,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
    ) -> None:
        self.sticky_wait = sticky_wait  # how long a session insists on its remembered slot
        self.max_sessions = max_sessions
        self._engines: dict[str, _Engine] = {}
        # (engine_key, tenant, session) -> slot; tenants choose session ids, so they may clash.
        self._sessions: OrderedDict[tuple[str, str, str], Slot] = OrderedDict()

    def slot(self, request: SlotRequest) -> _Lease:
        """An async context manager yielding a Placement; raises SchedulerBusy on enter."""
        return _Lease(self, request)

    async def acquire(self, request: SlotRequest) -> Placement:
        """Like `slot()`, for callers that cannot use `async with`: pair with `release()`."""
        engine_key, tenant, session = request.engine_key, request.tenant, request.session
        max_queue, max_wait = request.max_queue, request.max_wait
        engine = self._engine(engine_key, request.replicas, request.slots)
        state = engine.tenant(tenant, request.weight)
        key = None if session is None else (engine_key, tenant, session)
        preferred = None if key is None else engine.valid(self._sessions.get(key))
        insist = request.insist and preferred is not None and self.sticky_wait > 0
        slot = None
        order = request.replica_order
        if not engine.waiting:  # nobody queued: no fairness decision to make
            slot = engine.find_slot(preferred, insist, order)
        if slot is None and (engine.waiting >= max_queue or max_wait <= 0):
            # No room to wait. A slot may still be idle because the waiters insist on theirs.
            slot = engine.find_slot(preferred, False, order)
            if slot is None:
                engine.rejected_queue_full += 1
                raise SchedulerBusy(engine_key, engine.retry_after(), "queue_full")
        if slot is not None:
            engine.occupy(slot, state, 0.0)
            return self._placed(engine, key, preferred, slot, 0.0)
        return await self._wait(engine, state, key, preferred, insist, max_wait, order)

    async def _wait(
        self,
        engine: _Engine,
        tenant: _Tenant,
        key: tuple[str, str, str] | None,
        preferred: Slot | None,
        insist: bool,
        max_wait: float,
        replica_order: tuple[int, ...],
    ) -> Placement:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiter = engine.enqueue(tenant, preferred, insist, future, replica_order)
        engine.dispatch()  # the waiters ahead may all be insisting on busy slots
        deadline = waiter.enqueued_at + max_wait
        try:
            if waiter.strict and waiter.granted is None:
                # asyncio.wait leaves `future` alone on timeout, unlike wait_for.
                await asyncio.wait((future,), timeout=min(self.sticky_wait, max_wait))
                if waiter.granted is None:
                    waiter.strict = False  # give up on the cached slot: any free one will do
                    engine.dispatch()
            remaining = deadline - time.monotonic()
            if waiter.granted is None and remaining > 0:
                await asyncio.wait((future,), timeout=remaining)
        except BaseException:  # cancelled (client gone): no slot or queue entry may remain
            engine.abandon(waiter)
            raise
        if waiter.granted is None:
            engine.leave(waiter)
            engine.rejected_wait_timeout += 1
            raise SchedulerBusy(engine.key, engine.retry_after(), "wait_timeout")
        waited = time.monotonic() - waiter.enqueued_at
        return self._placed(engine, key, preferred, waiter.granted, waited)

    def _placed(
        self,
        engine: _Engine,
        key: tuple[str, str, str] | None,
        preferred: Slot | None,
        slot: Slot,
        waited: float,
    ) -> Placement:
        sticky = slot == preferred
        if key is not None:
            self._remember(key, slot)
            if preferred is not None:
                engine.sticky_hits += sticky
                engine.sticky_moves += not sticky
        return Placement(engine.key, slot[0], slot[1], waited, sticky, time.monotonic())

    def _remember(self, key: tuple[str, str, str], slot: Slot) -> None:
        sessions = self._sessions
        sessions[key] = slot
        sessions.move_to_end(key)
        if len(sessions) > self.max_sessions:
            sessions.popitem(last=False)

    def release(self, placement: Placement) -> None:
        """Give the slot back (exactly once per acquire); the next waiter gets it at once."""
        engine = self._engines[placement.engine_key]
        held = time.monotonic() - placement.granted_at
        engine.vacate((placement.replica, placement.slot), held)

    def _engine(self, key: str, replicas: int, slots: int) -> _Engine:
        engine = self._engines.get(key)
        if engine is None:
            engine = self._engines[key] = _Engine(key, replicas, slots)
        elif engine.replicas != replicas or engine.slots != slots:
            engine.resize(replicas, slots)
            engine.dispatch()  # more capacity may serve waiters now
        return engine

    def stats(self, engine_key: str) -> dict[str, Any]:
        engine = self._engines.get(engine_key) or _Engine(engine_key, 0, 0)
        return engine.stats()


scheduler = Scheduler()
