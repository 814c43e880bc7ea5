"""Batched, non-blocking request logging.

The /v1 path only appends a RequestLog to an in-memory buffer; a background task writes
the buffer with one bulk INSERT (plus one UPDATE of the keys' last-used time) every
REQUEST_LOG_FLUSH_SECONDS, and once more at shutdown.
"""

from __future__ import annotations

import asyncio
import logging

from channels.db import database_sync_to_async
from django.conf import settings
from django.utils import timezone

from apps.proxy.models import RequestLog
from apps.tenants.services import api_keys_touch

logger = logging.getLogger(__name__)


def _write(entries: list[RequestLog]) -> None:
    RequestLog.objects.bulk_create(entries)
    key_ids = sorted({entry.api_key_id for entry in entries if entry.api_key_id})
    api_keys_touch(key_ids=key_ids, used_at=timezone.now())


_write_async = database_sync_to_async(_write, thread_sensitive=False)


class RequestLogWriter:
    def __init__(self) -> None:
        self._pending: list[RequestLog] = []
        self._task: asyncio.Task | None = None

    def add(self, entry: RequestLog) -> None:
        self._pending.append(entry)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while self._pending:
            await asyncio.sleep(settings.REQUEST_LOG_FLUSH_SECONDS)
            await self.flush()

    async def flush(self) -> None:
        entries, self._pending = self._pending, []
        if not entries:
            return
        try:
            await _write_async(entries)
        except Exception:
            # Losing log lines must never break serving; say so loudly instead.
            logger.exception("could not write %d request logs", len(entries))


request_log_writer = RequestLogWriter()
