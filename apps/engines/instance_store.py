"""The engine manager's own PostgreSQL connection and its SQL on EngineInstance rows.

Ownership of a managed engine replica is a session-level advisory lock, so it lives as
long as the connection that took it: the manager keeps one dedicated async connection
(autocommit, outside Django's per-thread connections, which Django closes and reopens at
will). If the owning process dies, PostgreSQL drops the connection and the lock with it.

The same connection carries the few statements that must not hop to a thread: admitting
and releasing a request of another process on a replica (atomic, so a swap's drain sees
every request in flight across processes) and the owner's state updates.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from apps.core.db import connection_kwargs
from apps.engines.models import Engine, EngineInstance

_TABLE = EngineInstance._meta.db_table
NOW = object()  # as a value in ControlConnection.update: the database's now()
_ENGINE_TABLE = Engine._meta.db_table


def lock_key(*, engine_id: int, replica: int) -> int:
    """A stable signed 64-bit advisory lock key for one replica of one engine."""
    digest = hashlib.blake2b(f"gateway-engine:{engine_id}:{replica}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big", signed=True)


@dataclass(frozen=True)
class Admission:
    base_url: str
    generation: int


@dataclass(frozen=True)
class RowView:
    """What a follower needs to know about a replica it does not own."""

    state: str
    variant_id: int | None
    requested_variant_id: int | None
    generation: int
    last_error: str
    owner_alive: bool


@dataclass(frozen=True)
class OwnerView:
    """What the owner reads back each tick: requests from others, and its engine's knobs."""

    requested_action: str
    requested_variant_id: int | None
    remote_in_flight: int
    remote_idle_seconds: float | None
    kind: str
    idle_ttl_seconds: int | None


class ControlConnection:
    """One async autocommit connection; psycopg serializes statements on it."""

    def __init__(self) -> None:
        self._conn: psycopg.AsyncConnection | None = None
        self._connecting = asyncio.Lock()
        # Connections opened so far. A lock taken in one epoch is gone in the next: the
        # manager compares, because any statement reconnects a lost connection silently.
        self.epoch = 0

    async def connect(self) -> None:
        if self.connected:
            return
        # One caller at a time: two racing here would each open a connection, and the
        # locks taken on the one overwritten would go when it is garbage-collected, with
        # this process still believing it owns their replicas.
        async with self._connecting:
            if self.connected:
                return
            broken, self._conn = self._conn, None
            if broken is not None:
                await broken.close()
            self._conn = await psycopg.AsyncConnection.connect(
                **{**connection_kwargs(), "application_name": "gateway-engine-manager"},
                autocommit=True,
            )
            self.epoch += 1

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.closed

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
        self._conn = None

    async def rows(self, sql: str, params: dict[str, Any] | None = None) -> list[tuple]:
        await self.connect()
        assert self._conn is not None
        async with self._conn.cursor() as cursor:
            await cursor.execute(sql, params)
            return await cursor.fetchall() if cursor.description else []

    async def one(self, sql: str, params: dict[str, Any] | None = None) -> tuple | None:
        rows = await self.rows(sql, params)
        return rows[0] if rows else None

    async def ping(self) -> None:
        await self.one("SELECT 1")

    # --- ownership ------------------------------------------------------------------

    async def try_lock(self, key: int) -> bool:
        row = await self.one("SELECT pg_try_advisory_lock(%(key)s)", {"key": key})
        return bool(row and row[0])

    async def unlock(self, key: int) -> None:
        await self.one("SELECT pg_advisory_unlock(%(key)s)", {"key": key})

    async def owner(self, row_id: int) -> tuple[int | None, str]:
        """The owner recorded on the row: process id and host."""
        row = await self.one(
            f"SELECT owner_pid, owner_host FROM {_TABLE} WHERE id = %(id)s", {"id": row_id}
        )
        return (row[0], row[1]) if row else (None, "")

    # --- rows -------------------------------------------------------------------------

    async def update(self, row_id: int, **fields: Any) -> None:
        """UPDATE the instance row; NOW as a value means the database's now()."""
        assignments, params = [], {"id": row_id}
        for name, value in fields.items():
            column = EngineInstance._meta.get_field(name).column
            if value is NOW:
                assignments.append(f"{column} = now()")
                continue
            assignments.append(f"{column} = %({name})s")
            params[name] = Jsonb(value) if name == "command" else value
        await self.rows(f"UPDATE {_TABLE} SET {', '.join(assignments)} WHERE id = %(id)s", params)

    async def claim(self, row_id: int, *, owner_pid: int, owner_host: str) -> None:
        """Make this process the row's owner: nothing runs yet, old leases are void."""
        await self.rows(
            f"""UPDATE {_TABLE} SET owner_pid = %(pid)s, owner_host = %(host)s,
                heartbeat_at = now(), generation = generation + 1,
                state = CASE WHEN state = 'failed' THEN 'failed' ELSE 'stopped' END,
                state_changed_at = now(), pid = NULL, port = NULL, base_url = '',
                command = '[]'::jsonb, started_at = NULL, swap_since = NULL,
                in_flight = 0, remote_in_flight = 0, queued = 0
              WHERE id = %(id)s""",
            {"id": row_id, "pid": owner_pid, "host": owner_host},
        )

    async def orphan(self, row_id: int) -> tuple[int | None, list[str], datetime | None, int]:
        """The process a previous owner recorded: pid, argv, start time; and the variant."""
        row = await self.one(
            f"SELECT pid, command, started_at, variant_id FROM {_TABLE} WHERE id = %(id)s",
            {"id": row_id},
        )
        if row is None:
            return None, [], None, 0
        return row[0], list(row[1] or []), row[2], row[3]

    async def close_for_launch(self, row_id: int, *, force: bool) -> bool:
        """Stop admitting other processes' requests, but only once none is in flight
        (unless forced): one statement, so no admission can slip in between."""
        condition = "" if force else " AND remote_in_flight = 0"
        row = await self.one(
            f"""UPDATE {_TABLE} SET state = 'starting', state_changed_at = now(),
                base_url = '', remote_in_flight = 0, generation = generation + 1
              WHERE id = %(id)s{condition} RETURNING id""",
            {"id": row_id},
        )
        return row is not None

    async def owner_view(self, row_id: int) -> OwnerView | None:
        row = await self.one(
            f"""SELECT i.requested_action, i.requested_variant_id, i.remote_in_flight,
                  EXTRACT(EPOCH FROM now() - i.last_used_at)::float8,
                  e.kind, e.idle_ttl_seconds
                FROM {_TABLE} i JOIN {_ENGINE_TABLE} e ON e.id = i.engine_id
               WHERE i.id = %(id)s""",
            {"id": row_id},
        )
        return OwnerView(*row) if row else None

    async def clear_request(self, row_id: int, *, action: str = "", variant_id: int = 0) -> None:
        """Forget a handled request, unless someone has written a new one meanwhile."""
        if action:
            await self.rows(
                f"UPDATE {_TABLE} SET requested_action = '' "
                "WHERE id = %(id)s AND requested_action = %(action)s",
                {"id": row_id, "action": action},
            )
        if variant_id:
            await self.rows(
                f"UPDATE {_TABLE} SET requested_variant_id = NULL "
                "WHERE id = %(id)s AND requested_variant_id = %(variant)s",
                {"id": row_id, "variant": variant_id},
            )

    async def pending_elsewhere(self, *, stale_seconds: float) -> list[tuple[int, int]]:
        """(engine, replica) of managed replicas that need an owner: someone asked for an
        action or a variant, or the recorded owner stopped heartbeating with a process."""
        rows = await self.rows(
            f"""SELECT i.engine_id, i.replica FROM {_TABLE} i
                JOIN {_ENGINE_TABLE} e ON e.id = i.engine_id
               WHERE e.kind = 'managed' AND (
                 i.requested_action <> '' OR i.requested_variant_id IS NOT NULL
                 OR (i.state IN ('starting', 'running', 'draining')
                     AND (i.heartbeat_at IS NULL
                          OR i.heartbeat_at < now() - make_interval(secs => %(stale)s))))""",
            {"stale": stale_seconds},
        )
        return [(engine_id, replica) for engine_id, replica in rows]

    # --- other processes' requests ----------------------------------------------------

    async def admit_remote(
        self, *, engine_id: int, replica: int, variant_id: int, grace: float, stale: float
    ) -> Admission | None:
        """Count a request in flight on the replica if it runs `variant_id` for admission
        (running, or draining for less than the swap grace) under a live owner."""
        row = await self.one(
            f"""UPDATE {_TABLE} SET remote_in_flight = remote_in_flight + 1,
                  last_used_at = now()
               WHERE engine_id = %(engine)s AND replica = %(replica)s
                 AND variant_id = %(variant)s AND base_url <> ''
                 AND state IN ('running', 'draining')
                 AND heartbeat_at > now() - make_interval(secs => %(stale)s)
                 AND (swap_since IS NULL
                      OR swap_since > now() - make_interval(secs => %(grace)s))
             RETURNING base_url, generation""",
            {
                "engine": engine_id,
                "replica": replica,
                "variant": variant_id,
                "grace": grace,
                "stale": stale,
            },
        )
        return Admission(base_url=row[0], generation=row[1]) if row else None

    async def release_remote(self, *, engine_id: int, replica: int, generation: int) -> None:
        await self.rows(
            f"""UPDATE {_TABLE} SET remote_in_flight = GREATEST(remote_in_flight - 1, 0),
                  last_used_at = now()
               WHERE engine_id = %(engine)s AND replica = %(replica)s
                 AND generation = %(generation)s""",
            {"engine": engine_id, "replica": replica, "generation": generation},
        )

    async def row_view(self, *, engine_id: int, replica: int, stale: float) -> RowView | None:
        row = await self.one(
            f"""SELECT state, variant_id, requested_variant_id, generation, last_error,
                  owner_pid IS NOT NULL
                  AND heartbeat_at > now() - make_interval(secs => %(stale)s)
                FROM {_TABLE} WHERE engine_id = %(engine)s AND replica = %(replica)s""",
            {"engine": engine_id, "replica": replica, "stale": stale},
        )
        return RowView(*row) if row else None

    async def request_variant(self, *, engine_id: int, replica: int, variant_id: int) -> None:
        """Ask the owner for a variant, first come first served: an earlier request for
        another variant is served (and cleared) before this one is written."""
        await self.rows(
            f"""UPDATE {_TABLE} SET requested_variant_id = %(variant)s, requested_at = now()
               WHERE engine_id = %(engine)s AND replica = %(replica)s
                 AND requested_variant_id IS NULL""",
            {"engine": engine_id, "replica": replica, "variant": variant_id},
        )

    async def serving_url(self, *, variant_ids: list[int], stale: float) -> str | None:
        """The root of a replica that runs one of `variant_ids` and admits requests under
        a live owner (any process's), or None."""
        row = await self.one(
            f"""SELECT base_url FROM {_TABLE}
               WHERE variant_id = ANY(%(variants)s) AND base_url <> ''
                 AND state IN ('running', 'draining')
                 AND heartbeat_at > now() - make_interval(secs => %(stale)s)
               ORDER BY replica LIMIT 1""",
            {"variants": variant_ids, "stale": stale},
        )
        return row[0] if row else None

    async def replica_variants(self, *, engine_id: int, stale: float) -> dict[int, int | None]:
        """Replica -> the variant it runs (admitting requests under a live owner), or
        None for a replica that runs nothing (stopped, failed, or no live owner)."""
        rows = await self.rows(
            f"""SELECT replica, CASE WHEN state IN ('running', 'draining') AND base_url <> ''
                  AND heartbeat_at > now() - make_interval(secs => %(stale)s)
                  THEN variant_id END
                FROM {_TABLE} WHERE engine_id = %(engine)s""",
            {"engine": engine_id, "stale": stale},
        )
        return {replica: variant for replica, variant in rows}
