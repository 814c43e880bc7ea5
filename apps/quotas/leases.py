"""Per-process quota leases: most reservations never leave the gateway process, and none
can push usage past a limit.

Reserving every request in PostgreSQL costs it a round trip before the engine is called
and another to settle, both on the quota's one hot window row (measured: +5 ms p50 at
240 req/s, and a third of the throughput). So a window with plenty left is leased
instead: this process reserves a slice of it in PostgreSQL, as one reservation row like a
request's, renewed by `gateway_quota_lease_batch` (migration 0004), and grants requests
from that slice in memory. Every token a request holds is still reserved in PostgreSQL
under the window's lock, so the sum over all processes stays within the limit.

Policy, per window:
- Leased only while at least LEASE_MIN_REQUESTS requests of the largest size seen fit in
  what is left, and a lease takes at most 1/LEASE_SHARE of that. Below, every request
  reserves alone, exactly as without leases, so a quota's last tokens go one request at a
  time in arrival order, and the x-ratelimit headers are exact.
- Every QUOTA_LEASE_FLUSH_SECONDS the process renews its leases in one round trip: it
  charges what its requests used, keeps what those in flight hold, and asks for about
  twice what it granted in the interval. A lease that granted nothing is left alone (no
  round trip) and keeps its spare tokens for QUOTA_LEASE_IDLE_SECONDS, then ends: a burst
  after a quiet spell is granted at once instead of every request of it reserving alone
  (measured in bench/run.py (c): +11 ms at p99 for the first second after 15 s idle).
- Requests go on taking a lease's tokens while it is renewed (a renewal keeps all it
  covers but the spare tokens it gives back); one that runs dry is renewed at once, and
  requests reserve alone until it is.

What this trades (README, "Quotas"): usage in PostgreSQL lags by one interval at most; a
crashed process never charges its last interval and its slice stays reserved until the
stale-reservation sweep; the remaining-tokens header is as of the last renewal. A request
refused in PostgreSQL while this process holds spare leased tokens first gives them back
and tries again; spare tokens other processes hold (at most 1/LEASE_SHARE of what was
left, each) can still make a large request fail that would just fit.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime

import orjson
import psycopg
from django.conf import settings

from apps.core.db_batch import Batcher, json_array
from apps.quotas.models import scope_label
from apps.quotas.periods import window_end
from apps.quotas.state import QuotaState

logger = logging.getLogger(__name__)

LEASE_SHARE = 16
LEASE_MIN_REQUESTS = 64
# A lease has room for at least this many requests of the largest size seen.
LEASE_MIN_GRANTS = 8

LEASE_SQL = "SELECT * FROM gateway_quota_lease_batch(%s::jsonb)"

WindowKey = tuple[int, datetime]


@dataclass(eq=False)
class Lease:
    """This process's slice of one quota window."""

    quota_id: int
    start: datetime
    tenant_id: int
    largest: int  # the largest request seen: what "plenty left" is measured in
    reservation_id: uuid.UUID | None = None
    size: int = 0  # reserved in PostgreSQL under reservation_id
    held: int = 0  # by requests in flight
    used: int = 0  # by finished requests, not charged in PostgreSQL yet
    granted: int = 0  # since the last renewal
    # The window at the last renewal, without this lease.
    limit: int = 0
    window_used: int = 0
    others_reserved: int = 0
    active: bool = False
    renewal: asyncio.Future | None = None  # done when the renewal in flight is
    withheld: int = 0  # spare tokens the renewal in flight gives back: not grantable
    last_granted_at: float = field(default_factory=time.monotonic)

    @property
    def renewing(self) -> bool:
        return self.renewal is not None and not self.renewal.done()

    @property
    def free(self) -> int:
        return self.size - self.held - self.used

    @property
    def left(self) -> int:
        """What anyone could still reserve, as of the last renewal (our spare included)."""
        return self.limit - self.window_used - self.others_reserved - self.held - self.used

    def target(self) -> int:
        """Spare tokens the lease should have after the next renewal; 0 ends it."""
        if self.left < LEASE_MIN_REQUESTS * self.largest or self.idle_over():
            return 0
        wanted = 2 * self.granted if self.granted else self.free  # idle: keep what it has
        return min(max(wanted, LEASE_MIN_GRANTS * self.largest), self.left // LEASE_SHARE)

    def idle_over(self) -> bool:
        return time.monotonic() - self.last_granted_at >= settings.QUOTA_LEASE_IDLE_SECONDS

    def needs_renewal(self) -> bool:
        """Something to charge, to grow, or to end; an idle lease costs no round trip."""
        return self.granted > 0 or self.used > 0 or not self.active or self.idle_over()

    def state(self, quota: tuple) -> QuotaState:
        quota_id, period, _limit, key_name, _slug = quota
        return QuotaState(
            quota_id=quota_id,
            scope=scope_label(key_name),
            period=period,
            limit=self.limit,
            used=self.window_used + self.used,
            reserved=self.others_reserved + self.held,
            resets_at=window_end(period, self.start),
        )


@dataclass(eq=False)
class LeaseHold:
    """One request's tokens, held in the leases of all its windows."""

    leases: tuple[Lease, ...]
    tokens: int
    settled: bool = field(default=False)


class LeaseBook:
    """The leases of this process (of its event loop: tests run several loops)."""

    def __init__(self) -> None:
        self._leases: dict[WindowKey, Lease] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flusher: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()

    def _bind(self) -> None:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop, self._leases, self._flusher, self._tasks = loop, {}, None, set()

    def take(self, *, quotas: list, starts: list[datetime], tokens: int) -> LeaseHold | None:
        """Hold `tokens` in this process's leases of every window, or None (reserve alone)."""
        if not settings.QUOTA_LEASES:
            return None
        self._bind()
        leases = []
        for quota, start in zip(quotas, starts, strict=True):
            lease = self._leases.get((quota[0], start))
            if lease is None or not lease.active:
                return None
            if lease.free - lease.withheld < tokens:
                if tokens <= lease.size and not lease.renewing:  # ran dry: refill it now
                    self._renew_soon([lease])
                return None
            leases.append(lease)
        now = time.monotonic()
        for lease in leases:
            lease.held += tokens
            lease.granted += tokens
            lease.largest = max(lease.largest, tokens)
            lease.last_granted_at = now
        return LeaseHold(leases=tuple(leases), tokens=tokens)

    @staticmethod
    def states(hold: LeaseHold, quotas: list) -> list[QuotaState]:
        return [lease.state(quota) for lease, quota in zip(hold.leases, quotas, strict=True)]

    @staticmethod
    def settle(hold: LeaseHold, *, actual_tokens: int) -> None:
        """Count what the request used; it is charged in PostgreSQL at the next renewal."""
        if hold.settled:
            return
        hold.settled = True
        for lease in hold.leases:
            lease.held -= hold.tokens
            lease.used += actual_tokens

    def offer(
        self, *, tenant_id: int, quotas: list, starts: list[datetime], tokens: int,
        states: list[QuotaState],
    ) -> None:  # fmt: skip
        """After a request reserved alone: start leasing its windows that have plenty left."""
        if not settings.QUOTA_LEASES:
            return
        self._bind()
        by_quota = {state.quota_id: state for state in states}
        # A request is granted from leases only if every window it needs has one: when
        # one of them runs low, leasing the others would only hold their tokens.
        if any(
            quota[0] not in by_quota or by_quota[quota[0]].remaining < LEASE_MIN_REQUESTS * tokens
            for quota in quotas
        ):
            return
        new = []
        for quota, start in zip(quotas, starts, strict=True):
            state = by_quota[quota[0]]
            if (quota[0], start) in self._leases:
                continue
            lease = Lease(
                quota_id=quota[0], start=start, tenant_id=tenant_id, largest=tokens,
                granted=tokens, limit=state.limit, window_used=state.used,
                others_reserved=state.reserved,
            )  # fmt: skip
            self._leases[(quota[0], start)] = lease
            new.append(lease)
        if new:
            self._renew_soon(new)
            if self._flusher is None or self._flusher.done():
                self._flusher = asyncio.ensure_future(self._flush_every_interval())

    async def give_back(self, *, quotas: list, starts: list[datetime], tokens: int) -> bool:
        """End this process's leases of these windows (a request did not fit beside their
        spare tokens); True if any spare tokens went back."""
        self._bind()
        leases = [
            lease
            for quota, start in zip(quotas, starts, strict=True)
            if (lease := self._leases.get((quota[0], start))) is not None
        ]
        await asyncio.gather(*(lease.renewal for lease in leases if lease.renewing))
        spare = [lease for lease in leases if lease.free > 0]
        for lease in spare:
            lease.largest = max(lease.largest, tokens)
            lease.granted, lease.last_granted_at = 0, float("-inf")  # target() == 0: it ends
        await self._renew(spare)
        return bool(spare)

    def _renew_soon(self, leases: list[Lease]) -> None:
        task = asyncio.ensure_future(self._renew(leases))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _flush_every_interval(self) -> None:
        # Renewals run as their own tasks: stopping this loop never interrupts one.
        while self._leases:
            await asyncio.sleep(settings.QUOTA_LEASE_FLUSH_SECONDS)
            due = [lease for lease in self._leases.values() if lease.needs_renewal()]
            if due:
                self._renew_soon(due)

    async def _renew(self, leases: list[Lease]) -> None:
        leases = [lease for lease in leases if not lease.renewing]
        if not leases:
            return
        done = asyncio.get_running_loop().create_future()
        asked = [self._ask(lease, done) for lease in leases]
        try:
            results = await asyncio.gather(
                *(asyncio.shield(lease_batcher.submit(item)) for item, *_ in asked),
                return_exceptions=True,
            )
        finally:
            done.set_result(None)
        for lease, (_, charged, new_id, target), row in zip(leases, asked, results, strict=True):
            lease.withheld = 0
            if isinstance(row, BaseException):
                # Nothing changed in PostgreSQL (one transaction): try again next interval.
                logger.warning("quota lease renewal failed: %s", row)
                lease.active = target > 0
                continue
            lease.used -= charged
            self._apply(lease, row, new_id=new_id, target=target)

    @staticmethod
    def _ask(lease: Lease, done: asyncio.Future) -> tuple[bytes, int, uuid.UUID, int]:
        """The renewal of `lease`: it keeps every token it covers (requests may go on taking
        them meanwhile) except the spare ones it gives back, which are withheld until it is
        done, and asks for what its target lacks."""
        lease.renewal = done
        target, new_id, charged, free = lease.target(), uuid.uuid4(), lease.used, lease.free
        if target == 0:
            lease.active, lease.withheld = False, max(0, free)
        elif free > 2 * target:
            lease.withheld = free - target
        lease.granted = 0
        item = {
            "old": str(lease.reservation_id) if lease.reservation_id else None,
            "new": str(new_id),
            "charge": charged,
            "keep": max(0, lease.size - charged - lease.withheld),
            "want": max(0, target - free),
            "quota": lease.quota_id,
            "start": lease.start.isoformat(),
            "tenant": lease.tenant_id,
        }
        return orjson.dumps(item), charged, new_id, target

    def _apply(self, lease: Lease, row: tuple, *, new_id: uuid.UUID, target: int) -> None:
        granted, limit, used, reserved = row
        if granted is None:  # the quota is gone: its requests in flight settle into nothing
            lease.size, lease.reservation_id, lease.active = 0, None, False
            self._forget(lease)
            return
        lease.size, lease.reservation_id = granted, new_id if granted > 0 else None
        lease.limit, lease.window_used, lease.others_reserved = limit, used, reserved - granted
        lease.active = target > 0
        if not lease.active and lease.held <= 0 and lease.used <= 0 and granted == 0:
            self._forget(lease)

    def _forget(self, lease: Lease) -> None:
        key = (lease.quota_id, lease.start)
        if self._leases.get(key) is lease:
            del self._leases[key]

    async def close(self) -> None:
        """Charge and give back everything (shutdown), after the requests have settled."""
        if self._loop is not asyncio.get_running_loop():
            self._loop, self._leases, self._flusher, self._tasks = None, {}, None, set()
            return
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        for lease in self._leases.values():
            lease.granted, lease.last_granted_at = 0, float("-inf")
        await self._renew(list(self._leases.values()))
        self._leases, self._flusher = {}, None
        await lease_batcher.close()


async def execute_leases(connection: psycopg.AsyncConnection, items: list[bytes]) -> list:
    """Rows (granted, limit, used, reserved) of each item, in the items' order."""
    async with connection.cursor() as cursor:
        await cursor.execute(LEASE_SQL, [json_array(items)])
        rows = await cursor.fetchall()
    by_item: list = [None] * len(items)
    for n, *row in rows:
        by_item[n - 1] = tuple(row)
    return by_item


lease_batcher: Batcher[bytes] = Batcher("quota-lease", execute_leases)
lease_book = LeaseBook()
