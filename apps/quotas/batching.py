"""Quota reservations and settlements in batches (apps/proxy/db_batch.py), through the
functions of migration 0003."""

from __future__ import annotations

import psycopg

from apps.core.db_batch import Batcher, json_array

RESERVE_BATCH_SQL = "SELECT * FROM gateway_quota_reserve_batch(%s::jsonb)"
SETTLE_BATCH_SQL = "SELECT gateway_quota_settle_batch(%s::uuid[], %s::bigint[])"


async def execute_reserves(connection: psycopg.AsyncConnection, items: list[bytes]) -> list:
    """Rows (window, quota, used, reserved, granted) of each item, in the items' order."""
    async with connection.cursor() as cursor:
        await cursor.execute(RESERVE_BATCH_SQL, [json_array(items)])
        rows = await cursor.fetchall()
    by_item: list[list[tuple]] = [[] for _ in items]
    for n, *row in rows:
        by_item[n - 1].append(tuple(row))
    return by_item


async def execute_settles(
    connection: psycopg.AsyncConnection, items: list[tuple[str, int]]
) -> list[None]:
    ids = [reservation_id for reservation_id, _ in items]
    actual = [tokens for _, tokens in items]
    async with connection.cursor() as cursor:
        await cursor.execute(SETTLE_BATCH_SQL, [ids, actual])
    return [None] * len(items)


reserve_batcher: Batcher[bytes] = Batcher("quota-reserve", execute_reserves)
settle_batcher: Batcher[tuple[str, int]] = Batcher("quota-settle", execute_settles)
