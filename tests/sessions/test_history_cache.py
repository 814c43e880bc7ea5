"""The per-process history cache (apps/sessions/history_cache.py) with the open's deltas
(migration 0008): what it sends is always what a full open would send, and the open
returns only what the process does not hold."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connection

from apps.core.context import messages_with_history
from apps.sessions import store
from apps.sessions.history_cache import HistoryCache
from apps.sessions.models import ChatSession, Message
from apps.sessions.prompts import StoredHistory
from apps.sessions.services import history_trim, session_delete
from tests.sessions.test_services import TOOL_CALL, load, record, record_messages, reply, user

pytestmark = pytest.mark.django_db

MB = 1024 * 1024


class Opener:
    """Opens sessions as the /v1 stage does (the cache around the open), with the sync
    driver, and keeps the rows the open returned."""

    def __init__(self, cache: HistoryCache) -> None:
        self.cache = cache
        self.rows: list[store.OpenRow] = []

    def __call__(self, tenant: Any, external_id: str = "chat-1", cap: int | None = None):
        request = self.cache.request(
            store.open_item(tenant_id=tenant.pk, external_id=external_id, cap=cap)
        )
        row = store.open_now(request.item)
        self.rows.append(row)
        return self.cache.opened(request, row)

    @property
    def last_was_delta(self) -> bool:
        return self.rows[-1][11]

    @property
    def last_text(self) -> bytes:
        text = self.rows[-1][5]
        return text.encode() if isinstance(text, str) else text


@pytest.fixture
def cached() -> Opener:
    return Opener(HistoryCache(64 * MB))


def uncached(tenant: Any, external_id: str = "chat-1", cap: int | None = None) -> StoredHistory:
    return Opener(HistoryCache(0))(tenant, external_id, cap)


def sent(history: StoredHistory, dropped_units: int = 0) -> list[dict[str, Any]]:
    return messages_with_history([], history.kept(dropped_units))


def session_pk(tenant: Any, external_id: str = "chat-1") -> int:
    return load(tenant, external_id).session_pk


@pytest.mark.parametrize("cap", [None, 45, 1000])
def test_it_gives_the_same_history_as_a_full_open_turn_after_turn(alice, cached, cap):
    pk = session_pk(alice.tenant)
    for i in range(6):
        record(pk, f"q{i}", f"a{i}", token_counts={0: 10}, reply_tokens=10)
        assert cached(alice.tenant, cap=cap) == uncached(alice.tenant, cap=cap)


def test_it_returns_only_the_new_messages_on_the_second_open(alice, cached):
    pk = session_pk(alice.tenant)
    for i in range(20):
        record(pk, f"old question {i}", f"old answer {i}")
    cached(alice.tenant, cap=4096)
    record(pk, "new question", "new answer")

    history = cached(alice.tenant, cap=4096)

    assert cached.last_was_delta
    assert cached.last_text == b'{"role": "user", "content": "new question"},' + (
        b'{"role": "assistant", "content": "new answer"}'
    )
    assert sent(history)[-2:] == [user("new question"), reply("new answer")]
    assert len(sent(history)) == 42


def test_it_merges_tool_messages_into_the_turn_they_continue(alice, cached):
    """A tool-loop turn stores assistant and tool messages after the user's; a delta that
    starts with them belongs to the last held turn, which trimming drops whole."""
    pk = session_pk(alice.tenant)
    record(pk, "first", "one", token_counts={0: 5}, reply_tokens=5)
    record_messages(pk, [user("ask")], "calling", token_counts={0: 5}, reply_tokens=5)
    cached(alice.tenant)
    result = {"role": "tool", "tool_call_id": "c1", "content": "found"}
    # Recorded straight after, without a user message: they continue the turn of "ask".
    store.record_now({"session": pk, "messages": [
        {"role": "assistant", "payload": TOOL_CALL, "tokens": 7, "model": "m"},
        {"role": "tool", "payload": result, "tokens": 1, "model": "m"},
    ]})  # fmt: skip

    history = cached(alice.tenant)

    assert cached.last_was_delta
    assert cached.rows[-1][12]
    assert history == uncached(alice.tenant)
    assert history.unit_messages == (2, 4)
    assert history.unit_tokens == (10, 18)
    assert sent(history, 1) == [user("ask"), reply("calling"), TOOL_CALL, result]


def test_it_drops_a_continuation_of_a_turn_the_cap_already_cut(alice, cached):
    pk = session_pk(alice.tenant)
    record(pk, "big", "reply", token_counts={0: 50}, reply_tokens=50)
    cached(alice.tenant, cap=60)  # the turn alone (100) exceeds the cap: nothing held
    store.record_now({"session": pk, "messages": [
        {"role": "assistant", "payload": reply("more"), "tokens": 1, "model": "m"},
    ]})  # fmt: skip
    record(pk, "small", "ok", token_counts={0: 5}, reply_tokens=5)

    history = cached(alice.tenant, cap=60)

    assert history == uncached(alice.tenant, cap=60)
    assert sent(history) == [user("small"), reply("ok")]


@pytest.mark.parametrize("budget", [5, 25, 45, 70, 200])
def test_it_trims_with_a_cap_to_the_messages_of_a_full_open(alice, cached, budget):
    pk = session_pk(alice.tenant)
    for i in range(8):
        record(pk, f"q{i}", f"a{i}", token_counts={0: 10}, reply_tokens=10)
        cached(alice.tenant, cap=budget)
    record(pk, "unknown", "count")  # stored without counts: the cap counts them as 0

    def trimmed(history: StoredHistory) -> list[dict[str, Any]]:
        kept = history_trim(history, fixed_tokens=3, budget_tokens=budget)
        return messages_with_history([], kept)

    assert trimmed(cached(alice.tenant, cap=budget)) == trimmed(uncached(alice.tenant, cap=budget))
    assert cached.last_was_delta


def test_it_includes_turns_another_process_recorded(alice, cached):
    pk = session_pk(alice.tenant)
    record(pk, "here", "1")
    cached(alice.tenant)
    record(pk, "elsewhere", "2")  # through the services, as another process would
    record(pk, "and again", "3")

    history = cached(alice.tenant)

    assert [m["content"] for m in sent(history)] == ["here", "1", "elsewhere", "2",
                                                     "and again", "3"]  # fmt: skip


def test_it_never_sends_a_deleted_message_again(alice, cached):
    pk = session_pk(alice.tenant)
    record(pk, "my password is hunter2", "noted")
    record(pk, "hello", "hi")
    cached(alice.tenant)
    Message.objects.filter(session_id=pk, payload__content__icontains="hunter2").delete()
    record(pk, "what did I say?", "nothing secret")

    history = cached(alice.tenant)

    assert not cached.last_was_delta
    assert "hunter2" not in str(sent(history))
    assert history == uncached(alice.tenant)


def test_it_never_sends_an_edited_message_as_it_was(alice, cached):
    pk = session_pk(alice.tenant)
    record(pk, "secret text", "ok")
    cached(alice.tenant)
    Message.objects.filter(session_id=pk, position=0).update(payload=user("redacted"))

    history = cached(alice.tenant)

    assert [m["content"] for m in sent(history)] == ["redacted", "ok"]


def test_it_starts_over_when_the_session_is_deleted_and_reopened(alice, cached):
    pk = session_pk(alice.tenant)
    record(pk, "before delete", "ok")
    cached(alice.tenant)
    assert session_delete(tenant_id=alice.tenant.pk, external_id="chat-1")
    record(session_pk(alice.tenant), "after", "fine")

    assert [m["content"] for m in sent(cached(alice.tenant))] == ["after", "fine"]


def test_it_starts_over_after_the_messages_are_truncated(alice, cached):
    pk = session_pk(alice.tenant)
    record(pk, "gone", "too")
    cached(alice.tenant)
    with connection.cursor() as cursor:
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")  # the test's inserts are pending
        cursor.execute("TRUNCATE chat_sessions_message")
    record(pk, "fresh", "start")

    assert [m["content"] for m in sent(cached(alice.tenant))] == ["fresh", "start"]


def test_it_never_shows_one_tenant_another_tenants_cached_history(alice, bob, cached):
    record(session_pk(alice.tenant, "shared-id"), "alice's secret", "ok")
    cached(alice.tenant, "shared-id")
    bob_pk = session_pk(bob.tenant, "shared-id")
    record(bob_pk, "bob's question", "sure")

    assert [m["content"] for m in sent(cached(bob.tenant, "shared-id"))] == [
        "bob's question",
        "sure",
    ]
    assert "alice" not in str(sent(cached(bob.tenant, "shared-id")))


def test_it_gives_a_full_history_to_a_request_that_names_another_session(alice, bob):
    """Even a `known` that names another session (a bug in the gateway's keys) gets that
    session's own whole history, never a delta on top of the other one."""
    alice_pk = session_pk(alice.tenant, "s")
    record(alice_pk, "alice", "1")
    alice_row = store.open_now(store.open_item(tenant_id=alice.tenant.pk, external_id="s"))
    record(session_pk(bob.tenant, "s"), "bob", "2")
    known = {"session": alice_pk, "version": alice_row[13], "upto": alice_row[14]}

    row = store.open_now({**store.open_item(tenant_id=bob.tenant.pk, external_id="s"),
                          "known": known})  # fmt: skip

    assert row[11] is False
    assert b"bob" in store.context_parts(row, variant_system_prompt="")[2].json


def test_it_stays_under_its_byte_bound_dropping_the_least_recently_used(alice):
    cache = HistoryCache(6000)
    opener = Opener(cache)
    for name in ("a", "b", "c", "d"):
        record(session_pk(alice.tenant, name), "x" * 1500, "y")
        opener(alice.tenant, name)
        opener(alice.tenant, "a")  # keeps "a" recently used

    assert cache.bytes <= 6000
    assert cache.get((alice.tenant.pk, "a", None)) is not None
    assert cache.get((alice.tenant.pk, "b", None)) is None
    assert cache.get((alice.tenant.pk, "d", None)) is not None


def test_it_holds_nothing_when_turned_off(alice):
    cache = HistoryCache(0)
    record(session_pk(alice.tenant), "q", "a")

    Opener(cache)(alice.tenant)

    assert len(cache) == 0
    assert cache.bytes == 0


def test_it_bumps_the_version_only_when_stored_messages_change(alice):
    pk = session_pk(alice.tenant)

    def version() -> int:
        with connection.cursor() as cursor:
            cursor.execute("SELECT history_version FROM chat_sessions_chatsession WHERE id = %s",
                           [pk])  # fmt: skip
            return cursor.fetchone()[0]

    first = version()
    record(pk, "q", "a")
    assert version() == first  # the hot path's inserts
    Message.objects.filter(session_id=pk, position=1).update(tokens=3)
    edited = version()
    Message.objects.filter(session_id=pk, position=1).delete()
    assert len({first, edited, version()}) == 3
    assert ChatSession.objects.filter(pk=pk).exists()
