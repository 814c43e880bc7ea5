"""Opening a session and recording a turn: the SQL functions of migrations 0002-0008, driven
from sync code (Django's connection: services, admin, tests) or from the async /v1
pipeline (in batches, apps/core/db_batch.py). One implementation, two drivers."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson
import psycopg
from django.db import connection
from psycopg.adapt import Loader

from apps.core.db_batch import Batcher, json_array
from apps.sessions.history_cache import answer_of
from apps.sessions.prompts import SYSTEM_ROLES, StoredHistory, system_prompt_resolve

OPEN_SQL = "SELECT * FROM gateway_session_open_batch(%s::jsonb)"
RECORD_SQL = "SELECT gateway_session_record_batch(%s::jsonb)"

# (n, session id, created, session prompt, tenant prompt, history, unit offsets, unit
# tokens, unit messages, unit stored counts, unit media, delta, continues, history
# version, last position): see migrations 0007 and 0008. Texts are str from Django's
# connection, bytes from the batch connection (_TextAsBytes).
OpenRow = tuple[int, int, bool, str | bytes, str | bytes, str | bytes, list[int], list[int],
                list[int], list[int], list[bool], bool, bool, int, int]  # fmt: skip


def open_item(*, tenant_id: int, external_id: str, cap: int | None = None) -> dict[str, Any]:
    """With `cap` (the model's largest context, tokens), only the history that could still
    fit comes back (migration 0006); without it, all of it."""
    item: dict[str, Any] = {"tenant": tenant_id, "external_id": external_id}
    if cap:
        item["cap"] = cap
    return item


def context_parts(
    row: OpenRow, *, variant_system_prompt: str, history: StoredHistory | None = None
) -> tuple[int, str, StoredHistory]:
    """(session pk, the system prompt that applies, its history) from an open row: the
    row's own history (a full open), unless the history cache made it (`history`). The
    history stays text: the engine gets it as stored (apps/core/context.py engine_body)."""
    session_pk, session_prompt, tenant_prompt = row[1], row[3], row[4]
    system_prompt = system_prompt_resolve(
        tenant_system_prompt=_str(tenant_prompt),
        variant_system_prompt=variant_system_prompt,
        session_system_prompt=_str(session_prompt),
    )
    if history is None:
        history = answer_of(row).stored()
    return session_pk, system_prompt, history


def _str(text: str | bytes) -> str:
    return text.decode() if isinstance(text, bytes) else text


def turn_item(
    *,
    session_pk: int,
    new_messages: list[dict[str, Any]],
    reply: dict[str, Any],
    model: str,
    metrics: Any,
    token_counts: dict[int, int],
    reply_tokens: int | None,
) -> dict[str, Any]:
    """The client's new (non-system) messages and the reply, as the record function takes
    them (serialize it with `serialized`); the reply carries the engine's metrics."""
    messages = [
        {"role": str(payload.get("role") or ""), "payload": payload,
         "tokens": token_counts.get(index), "model": model}
        for index, payload in enumerate(new_messages)
        if payload.get("role") not in SYSTEM_ROLES
    ]  # fmt: skip
    answer = {"role": "assistant", **reply}
    messages.append(
        {
            "role": "assistant",
            "payload": answer,
            "tokens": metrics.tg_tokens if reply_tokens is None else reply_tokens,
            "model": model,
            "prompt_tokens": metrics.prompt_tokens,
            "cached_tokens": metrics.cached_tokens,
            "pp_tokens": metrics.pp_tokens,
            "pp_started_at": _epoch(metrics.pp_started_at),
            "pp_finished_at": _epoch(metrics.pp_finished_at),
            "tg_tokens": metrics.tg_tokens,
            "tg_started_at": _epoch(metrics.tg_started_at),
            "tg_finished_at": _epoch(metrics.tg_finished_at),
        }
    )
    return {"session": session_pk, "messages": messages}


def _epoch(moment: datetime | None) -> float | None:
    return moment.timestamp() if moment is not None else None


def serialized(item: dict[str, Any]) -> bytes:
    """`item` as JSON that PostgreSQL's jsonb takes: a message (the client's or the
    engine's) with U+0000 in it must not fail the turn. Checked on the serialized bytes,
    where it is always escaped, so the common case costs one search."""
    data = orjson.dumps(item)
    return orjson.dumps(storable(item)) if b"\\u0000" in data else data


def storable(value: Any) -> Any:
    """`value` with U+0000 replaced by U+FFFD: PostgreSQL's jsonb cannot hold NUL, and a
    message (the client's or the engine's) that has one must not fail the turn."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd") if "\x00" in value else value
    if isinstance(value, dict):
        return {storable(k): storable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [storable(item) for item in value]
    return value


# --- sync driver -------------------------------------------------------------------------


def open_now(item: dict[str, Any]) -> OpenRow:
    with connection.cursor() as cursor:
        cursor.execute(OPEN_SQL, [json_array([orjson.dumps(item)])])
        return cursor.fetchone()


def record_now(item: dict[str, Any]) -> None:
    with connection.cursor() as cursor:
        cursor.execute(RECORD_SQL, [json_array([serialized(item)])])


# --- async driver (batches) --------------------------------------------------------------


class _TextAsBytes(Loader):
    """Text columns as the UTF-8 bytes PostgreSQL sent: the history goes into the engine's
    body as is, and decoding it (then encoding it again) cost as much as the rest of the
    request's work on it (~0.16 ms for 200 KB of non-ASCII text)."""

    def load(self, data: Any) -> bytes:
        return bytes(data)


async def _execute_opens(conn: psycopg.AsyncConnection, items: list[bytes]) -> list[OpenRow]:
    async with conn.cursor() as cursor:
        cursor.adapters.register_loader("text", _TextAsBytes)
        await cursor.execute(OPEN_SQL, [json_array(items)])
        rows = await cursor.fetchall()
    by_item: list[Any] = [None] * len(items)
    for row in rows:
        by_item[row[0] - 1] = row
    return by_item


async def _execute_records(conn: psycopg.AsyncConnection, items: list[bytes]) -> list[None]:
    async with conn.cursor() as cursor:
        await cursor.execute(RECORD_SQL, [json_array(items)])
    return [None] * len(items)


# Items are orjson.dumps(open_item()) / serialized(turn_item()), made by the submitter.
open_batcher: Batcher[bytes] = Batcher("session-open", _execute_opens)
record_batcher: Batcher[bytes] = Batcher("session-record", _execute_records)
