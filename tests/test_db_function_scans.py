"""The server-side functions every /v1 request calls reach their rows through indexes, so
their cost does not grow with the tables (a sequential scan of the sessions once made every
recorded turn cost ~2 ms at 5,000 sessions, and more with each one).

Each test fills a table far past one page and analyzes it, as autovacuum would (which also
drops the plans this connection cached while the table was tiny, where a sequential scan is
right), calls a function and counts the sequential scans this transaction made on the
table (pg_stat_xact_user_tables).

Plans a connection made while the tables were tiny are tested too: they live until the
next ANALYZE, and a fresh database's tables outgrow them within seconds."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from django.db import connection

from apps.quotas.batching import RESERVE_BATCH_SQL, SETTLE_BATCH_SQL
from apps.quotas.leases import LEASE_SQL
from apps.quotas.models import Quota, QuotaWindow, Reservation
from apps.quotas.periods import window_start
from apps.quotas.services import quota_set
from apps.sessions import store
from apps.sessions.models import ChatSession, Message
from tests.conftest import TenantKey

pytestmark = pytest.mark.django_db

ROWS = 3000
LONG = 500  # messages of one long session
NOW = datetime(2026, 11, 22, 18, 30, tzinfo=UTC)


def xact_stat(model: type, figure: str) -> int:
    """A figure of pg_stat_xact_user_tables for the table: this transaction's so far."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT {figure} FROM pg_stat_xact_user_tables WHERE relid = %s::regclass",
            [model._meta.db_table],
        )
        row = cursor.fetchone()
    return row[0] if row else 0


def seq_scans(model: type) -> int:
    return xact_stat(model, "coalesce(seq_scan, 0)")


def rows_read(model: type) -> int:
    """Rows this transaction read from the table, by sequential and by index scans."""
    return xact_stat(model, "coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0)")


def plan_for_any_values() -> None:
    """From now on this transaction reuses one plan per statement, made on first use
    without looking at the values (what a connection settles on after five calls)."""
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        cursor.execute("DISCARD PLANS")


def analyze(*models: type) -> None:
    with connection.cursor() as cursor:
        for model in models:
            cursor.execute(f"ANALYZE {model._meta.db_table}")


def run(sql: str, *params: object) -> list[tuple]:
    with connection.cursor() as cursor:
        cursor.execute(sql, list(params))
        return cursor.fetchall() if cursor.description else []


def many_sessions(owner: TenantKey, *, analyzed: bool = True) -> list[ChatSession]:
    sessions = ChatSession.objects.bulk_create(
        ChatSession(tenant=owner.tenant, external_id=f"s-{i}") for i in range(ROWS)
    )
    Message.objects.bulk_create(
        Message(session=s, position=0, role="user", payload={"role": "user", "content": "hi"})
        for s in sessions
    )
    if analyzed:
        analyze(ChatSession, Message)
    return sessions


def test_it_opens_known_and_new_sessions_without_scanning_them_all(alice: TenantKey) -> None:
    many_sessions(alice)
    before = seq_scans(ChatSession), seq_scans(Message)

    for external_id in ("s-17", "a-new-one"):
        store.open_now(store.open_item(tenant_id=alice.tenant.pk, external_id=external_id))

    assert (seq_scans(ChatSession), seq_scans(Message)) == before


def test_it_records_turns_without_scanning_all_sessions(alice: TenantKey) -> None:
    sessions = many_sessions(alice)
    before = seq_scans(ChatSession), seq_scans(Message)
    turn = {"role": "user", "payload": {"role": "user", "content": "q"}, "model": "m"}

    run(store.RECORD_SQL, orjson.dumps([{"session": sessions[5].pk, "messages": [turn]}]).decode())

    assert (seq_scans(ChatSession), seq_scans(Message)) == before
    assert Message.objects.filter(session=sessions[5]).count() == 2


def test_it_opens_and_records_by_index_with_plans_made_on_empty_tables(
    alice: TenantKey,
) -> None:
    """Plans made before the tables filled up still reach one session and one message row
    per item: the open plans its statements for the tables as they are on every call (a
    plan made for a tiny table finds a session through the (tenant, last_active_at) index,
    reading every session of the tenant), the record reaches rows by primary key and by
    the (session, position) index, the only ones it could use."""
    turn = {"role": "user", "payload": {"role": "user", "content": "q"}, "model": "m"}
    plan_for_any_values()
    first = store.open_now(store.open_item(tenant_id=alice.tenant.pk, external_id="first"))
    store.record_now({"session": first[1], "messages": [turn]})
    sessions = many_sessions(alice, analyzed=False)

    before = rows_read(ChatSession), rows_read(Message)
    store.open_now(store.open_item(tenant_id=alice.tenant.pk, external_id="s-17"))
    opened = rows_read(ChatSession), rows_read(Message)
    store.record_now({"session": sessions[5].pk, "messages": [turn]})
    recorded = rows_read(ChatSession), rows_read(Message)

    # The open probes s-17 twice (is it new? then its row) and reads its one message; the
    # record updates one session and reads its last position. 0003's functions read 19
    # sessions (the open) and all 3,000 (the record) here; 0005's open, with plans made
    # once for every size, read all 3,000 twice.
    assert [opened[0] - before[0], opened[1] - before[1]] == [2, 1]
    assert [recorded[0] - opened[0], recorded[1] - opened[1]] == [1, 1]


@pytest.fixture
def old_windows(alice: TenantKey) -> Quota:
    """An hourly quota with ROWS past windows, and ROWS reservations in flight elsewhere."""
    quota = quota_set(tenant=alice.tenant, tokens=10**9, period="hour")
    QuotaWindow.objects.bulk_create(
        QuotaWindow(quota=quota, window_start=NOW - timedelta(hours=i + 1)) for i in range(ROWS)
    )
    Reservation.objects.bulk_create(
        Reservation(tenant=alice.tenant, tokens=1, window_ids=[0]) for _ in range(ROWS)
    )
    analyze(QuotaWindow, Reservation)
    return quota


def current_window(quota: Quota) -> QuotaWindow:
    return QuotaWindow.objects.get(quota=quota, window_start=window_start("hour", NOW))


def quota_scans() -> tuple[int, int]:
    # Quota itself is left out: one row here, where a sequential scan is the right plan.
    return seq_scans(QuotaWindow), seq_scans(Reservation)


def test_it_reserves_and_settles_in_batches_without_scanning(
    alice: TenantKey, old_windows: Quota
) -> None:
    before = quota_scans()
    reservation_id = str(uuid.uuid4())
    item = {
        "id": reservation_id, "tenant": alice.tenant.pk, "key": alice.api_key.pk, "tokens": 10,
        "quotas": [old_windows.pk], "starts": [window_start("hour", NOW).isoformat()],
    }  # fmt: skip

    rows = run(RESERVE_BATCH_SQL, orjson.dumps([item]).decode())
    run(SETTLE_BATCH_SQL, [reservation_id], [7])

    assert rows[0][-1] is True  # granted
    assert quota_scans() == before
    assert current_window(old_windows).used_tokens == 7


def test_it_renews_leases_without_scanning(alice: TenantKey, old_windows: Quota) -> None:
    before = quota_scans()
    start = window_start("hour", NOW).isoformat()
    first = {
        "old": None, "new": str(uuid.uuid4()), "charge": 0, "keep": 0, "want": 100,
        "quota": old_windows.pk, "start": start, "tenant": alice.tenant.pk,
    }  # fmt: skip
    renewal = first | {
        "old": first["new"],
        "new": str(uuid.uuid4()),
        "charge": 40,
        "keep": 60,
        "want": 40,
    }

    run(LEASE_SQL, orjson.dumps([first]).decode())
    run(LEASE_SQL, orjson.dumps([renewal]).decode())

    assert quota_scans() == before
    window = current_window(old_windows)
    assert (window.used_tokens, window.reserved_tokens) == (40, 100)


def test_it_reads_only_the_new_messages_of_a_session_the_gateway_holds(alice: TenantKey) -> None:
    """An open told what the gateway holds (migration 0008) reads the messages after it,
    by the (session, position) index, whatever the session's length and the plan's age."""
    plan_for_any_values()
    session = ChatSession.objects.create(tenant=alice.tenant, external_id="long")
    Message.objects.bulk_create(
        Message(session=session, position=i, role="user" if i % 2 == 0 else "assistant",
                payload={"role": "user", "content": "hi"}, tokens=5)
        for i in range(LONG)
    )  # fmt: skip
    many_sessions(alice)
    item = store.open_item(tenant_id=alice.tenant.pk, external_id="long", cap=10**6)
    full = store.open_now(item)
    turn = {"role": "user", "payload": {"role": "user", "content": "q"}, "model": "m"}
    store.record_now({"session": session.pk, "messages": [turn, turn | {"role": "assistant"}]})
    known = {"session": session.pk, "version": full[13], "upto": full[14]}
    before = seq_scans(Message), rows_read(Message)

    delta = store.open_now({**item, "known": known})

    # The cut's window and the history each read the two new messages.
    assert (seq_scans(Message), rows_read(Message) - before[1]) == (before[0], 4)
    assert (delta[11], delta[8], delta[14]) == (True, [2], LONG + 1)
