"""Batched, non-blocking request logging.

The /v1 path only appends a RequestLog to an in-memory buffer; a background task writes
the buffer with one bulk INSERT (plus one UPDATE of the keys' last-used time) every
REQUEST_LOG_FLUSH_SECONDS, and once more at shutdown.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from decimal import Decimal

import orjson
from channels.db import database_sync_to_async
from django.conf import settings
from django.db import connection
from django.utils import timezone

from apps.core.usage import UsageCall
from apps.request_logs.models import RequestLog
from apps.tenants.services import api_keys_touch

logger = logging.getLogger(__name__)


# The rows go to PostgreSQL as one JSON array (orjson, in C), unpacked there: the values
# are never formatted one by one in Python, and no model instances are built on the hot
# path (this thread shares the GIL with the event loop; a COPY's per-value formatting was
# ~2% of a plain request's CPU, bench/README.md). The admin's request-log list shows these
# columns, in this order.
LOG_COLUMNS = (
    "created_at",
    "tenant_id",
    "api_key_id",
    "endpoint",
    "model",
    "engine",
    "stream",
    "status_code",
    "error_code",
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
    "ttft_ms",
    "latency_ms",
    "client_disconnected",
    "usage_estimated",
    "safety_action",
    "cache_status",
    "cache_saved_tokens",
    "cost",
)
_API_KEY_INDEX = LOG_COLUMNS.index("api_key_id")


def log_row(**values: object) -> tuple:
    """One request's log values as a row for RequestLogWriter.add (LOG_COLUMNS order);
    a missing or unknown column is a KeyError/TypeError here, not a broken COPY later."""
    if len(values) != len(LOG_COLUMNS):
        raise TypeError(f"log_row takes exactly {LOG_COLUMNS}, got {sorted(values)}")
    return tuple(values[column] for column in LOG_COLUMNS)


def engine_call_row(call: UsageCall) -> tuple:
    """The log row of an engine call made for a tenant besides its request's own
    (apps/core/usage.py): its kind is the endpoint, its key the caller's (none for a
    document's ingestion)."""
    return log_row(
        created_at=timezone.now(),
        tenant_id=call.payer.tenant_id,
        api_key_id=call.payer.api_key_id,
        endpoint=call.kind,
        model=call.model,
        engine=call.engine,
        stream=False,
        status_code=call.status,
        error_code=call.error_code,
        prompt_tokens=call.prompt_tokens,
        cached_tokens=0,
        completion_tokens=call.completion_tokens,
        ttft_ms=None,
        latency_ms=call.latency_ms,
        client_disconnected=False,
        usage_estimated=call.estimated,
        safety_action="",
        cache_status="",
        cache_saved_tokens=0,
        cost=None,
    )


@functools.cache
def _insert_sql() -> str:
    """INSERT ... SELECT over the JSON array's rows, each value cast to its column's type."""
    fields = {field.column: field for field in RequestLog._meta.concrete_fields}
    values = ", ".join(
        f"(row->>{i})::{fields[column].cast_db_type(connection)}"
        for i, column in enumerate(LOG_COLUMNS)
    )
    return (
        f"INSERT INTO {RequestLog._meta.db_table} ({', '.join(LOG_COLUMNS)}) "
        f"SELECT {values} FROM jsonb_array_elements(%s::jsonb) AS row"
    )


def _json_value(value: object) -> object:
    if isinstance(value, Decimal):
        return str(value)  # exact: numeric reads it back as it was
    raise TypeError(f"{type(value).__name__} is not a request-log value")


def _write(rows: list[tuple]) -> None:
    with connection.cursor() as cursor:
        cursor.execute(_insert_sql(), [orjson.dumps(rows, default=_json_value).decode()])
    key_ids = sorted({row[_API_KEY_INDEX] for row in rows if row[_API_KEY_INDEX]})
    api_keys_touch(key_ids=key_ids, used_at=timezone.now())


_write_async = database_sync_to_async(_write, thread_sensitive=False)


class RequestLogWriter:
    def __init__(self) -> None:
        self._pending: list[tuple] = []
        self._task: asyncio.Task | None = None

    def add(self, row: tuple) -> None:
        """Queue one row, its values in LOG_COLUMNS order."""
        self._pending.append(row)
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
