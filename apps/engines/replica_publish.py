"""Publishing one replica's state on its EngineInstance row, where the admin and the other
gateway processes read it. One writer per replica, under a lock, so a slow earlier write
never overwrites a newer state; the log tail is written at most every LOG_PUBLISH_SECONDS
unless asked."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from apps.engines.instance_store import NOW, ControlConnection
from apps.engines.models import EngineInstance

if TYPE_CHECKING:
    from apps.engines.replica import Replica

logger = logging.getLogger(__name__)

State = EngineInstance.State
LOG_PUBLISH_SECONDS = 2.0


class ReplicaPublisher:
    def __init__(self, control: ControlConnection, row_id: int) -> None:
        self.control = control
        self.row_id = row_id
        self._lock = asyncio.Lock()
        self._state = ""
        self._swap = False
        self._log = (-1, 0.0)

    async def publish(
        self, replica: Replica, *, force_log: bool = False, variant_id: int | None = None
    ) -> None:
        """Write `replica`'s current state. The snapshot is taken under the lock, so a slow
        earlier write can never overwrite a newer state."""
        async with self._lock:
            fields = self._fields(replica, force_log=force_log, variant_id=variant_id)
            try:
                await self.control.update(self.row_id, **fields)
            except Exception:
                logger.exception("engine %s: cannot publish its state", replica.label)

    async def close_for_launch(self, *, force: bool) -> bool:
        """Close the row to new requests (see ControlConnection.close_for_launch); once
        closed, the row shows the replica starting."""
        async with self._lock:
            closed = await self.control.close_for_launch(self.row_id, force=force)
        if closed:
            self._state = State.STARTING
        return closed

    def _fields(
        self, replica: Replica, *, force_log: bool, variant_id: int | None
    ) -> dict[str, Any]:
        process = replica.process if replica.alive else None
        serving = replica.state in (State.RUNNING, State.DRAINING)
        admissible = process is not None and serving and not replica.closing
        variant = replica.variant
        fields: dict[str, Any] = {
            "state": replica.state,
            "variant_id": variant_id or (variant.id if variant else None),
            "pid": process.pid if process else None,
            "port": process.port if process else None,
            "base_url": process.base_url if admissible else "",
            "command": process.argv if process else [],
            "started_at": datetime.fromtimestamp(process.started_at, UTC) if process else None,
            "in_flight": replica.in_flight,
            "queued": replica.queued,
            "last_error": replica.last_error,
            "owner_pid": os.getpid(),
            "heartbeat_at": NOW,
        }
        if replica.state != self._state:
            fields["state_changed_at"] = NOW
            self._state = replica.state
        draining = replica.state == State.DRAINING
        if draining != self._swap:
            fields["swap_since"] = NOW if draining else None
            self._swap = draining
        version, published_at = self._log
        now = time.monotonic()
        log = replica.log
        if log.version != version and (force_log or now - published_at > LOG_PUBLISH_SECONDS):
            fields["log_tail"] = log.tail()
            self._log = (log.version, now)
        return fields
