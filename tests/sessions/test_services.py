"""Session storage: get-or-create per tenant, history, turn recording, prompts."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import orjson
import pytest
from django.db import connection
from django.utils import timezone

from apps.core.context import messages_with_history
from apps.engines.tokens import heuristic_message_tokens
from apps.sessions import store
from apps.sessions.models import ChatSession, Message
from apps.sessions.services import (
    StoredHistory,
    TurnMetrics,
    history_trim,
    session_context_load,
    session_delete,
    session_set_system_prompt,
    tenant_set_system_prompt,
    turn_record,
)

NO_METRICS = TurnMetrics(
    prompt_tokens=0,
    cached_tokens=0,
    pp_tokens=0,
    pp_started_at=None,
    pp_finished_at=None,
    tg_tokens=0,
    tg_started_at=None,
    tg_finished_at=None,
)


def load(tenant: Any, external_id: str = "chat-1", variant_system_prompt: str = ""):
    return session_context_load(
        tenant_id=tenant.pk, external_id=external_id, variant_system_prompt=variant_system_prompt
    )


def payloads(history: StoredHistory, dropped_units: int = 0) -> list[dict[str, Any]]:
    """The stored messages a history sends, parsed."""
    return messages_with_history([], history.kept(dropped_units))


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def reply(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": text}


def record(session_pk: int, question: str, answer: str | None, **kwargs: Any) -> None:
    kwargs.setdefault("metrics", NO_METRICS)
    turn_record(
        session_pk=session_pk,
        new_messages=[user(question)],
        reply=None if answer is None else reply(answer),
        model="fake-model",
        **kwargs,
    )


# --- loading -------------------------------------------------------------------------


@pytest.mark.django_db
def test_it_creates_a_session_on_first_use_with_empty_history(alice):
    context = load(alice.tenant)

    session = ChatSession.objects.get(pk=context.session_pk)
    assert (session.tenant_id, session.external_id) == (alice.tenant.pk, "chat-1")
    assert context.history == StoredHistory()
    assert context.system_prompt == ""


def _make_idle(session_pk: int) -> datetime:
    a_day_ago = timezone.now() - timedelta(days=1)
    ChatSession.objects.filter(pk=session_pk).update(last_active_at=a_day_ago)
    return a_day_ago


@pytest.mark.django_db
def test_it_reuses_the_session_without_marking_it_active(alice):
    first = load(alice.tenant)
    a_day_ago = _make_idle(first.session_pk)

    second = load(alice.tenant)

    assert second.session_pk == first.session_pk
    assert ChatSession.objects.count() == 1
    # Only a stored turn makes a session active: a request that failed left it as it was.
    assert ChatSession.objects.get(pk=first.session_pk).last_active_at == a_day_ago


@pytest.mark.django_db
def test_it_marks_the_session_active_when_a_turn_is_stored(alice):
    pk = load(alice.tenant).session_pk
    _make_idle(pk)

    record(pk, "q1", "a1")

    session = ChatSession.objects.get(pk=pk)
    assert timezone.now() - session.last_active_at < timedelta(minutes=1)


@pytest.mark.django_db
def test_it_returns_history_in_order(alice):
    pk = load(alice.tenant).session_pk
    record(pk, "q1", "a1", token_counts={0: 7})
    record(pk, "q2", "a2")

    history = load(alice.tenant).history

    assert payloads(history) == [user("q1"), reply("a1"), user("q2"), reply("a2")]
    assert history.unit_messages == (2, 2)
    # q1 as counted, a1 as the engine's 0 completion tokens; q2 stored without a count:
    # estimated as the gateway's heuristic would.
    assert history.unit_tokens == (7, heuristic_message_tokens(user("q2")))


@pytest.mark.django_db
def test_it_loads_a_known_session_in_a_constant_number_of_queries(
    alice, django_assert_max_num_queries
):
    pk = load(alice.tenant).session_pk
    for i in range(10):
        record(pk, f"q{i}", f"a{i}")

    with django_assert_max_num_queries(3):
        context = load(alice.tenant)

    assert sum(context.history.unit_messages) == 20


@pytest.mark.django_db
def test_it_picks_the_most_specific_system_prompt(alice):
    tenant_set_system_prompt(tenant_id=alice.tenant.pk, system_prompt="tenant")
    assert load(alice.tenant).system_prompt == "tenant"
    assert load(alice.tenant, variant_system_prompt="variant").system_prompt == "variant"

    session_set_system_prompt(tenant_id=alice.tenant.pk, external_id="chat-1", system_prompt="own")

    assert load(alice.tenant, variant_system_prompt="variant").system_prompt == "own"
    assert load(alice.tenant, "chat-2", variant_system_prompt="variant").system_prompt == "variant"


# --- tenant separation ---------------------------------------------------------------


@pytest.mark.django_db
def test_it_gives_each_tenant_its_own_session_for_the_same_id(alice, bob):
    alice_pk = load(alice.tenant, "shared").session_pk
    record(alice_pk, "alice's secret", "noted")
    session_set_system_prompt(
        tenant_id=alice.tenant.pk, external_id="shared", system_prompt="alice only"
    )

    bob_context = load(bob.tenant, "shared")

    assert bob_context.session_pk != alice_pk
    assert bob_context.history == StoredHistory()
    assert bob_context.system_prompt == ""
    assert ChatSession.objects.filter(external_id="shared").count() == 2


@pytest.mark.django_db
def test_it_deletes_only_the_tenants_own_session(alice, bob):
    alice_pk = load(alice.tenant, "shared").session_pk
    record(alice_pk, "q", "a")
    load(bob.tenant, "shared")

    assert session_delete(tenant_id=bob.tenant.pk, external_id="shared") is True
    assert session_delete(tenant_id=bob.tenant.pk, external_id="shared") is False

    assert ChatSession.objects.filter(pk=alice_pk).exists()
    assert Message.objects.filter(session_id=alice_pk).count() == 2


@pytest.mark.django_db
def test_it_deletes_the_messages_with_the_session(alice):
    pk = load(alice.tenant).session_pk
    record(pk, "q", "a")

    session_delete(tenant_id=alice.tenant.pk, external_id="chat-1")

    assert not Message.objects.exists()


@pytest.mark.django_db
def test_it_sets_a_system_prompt_on_a_missing_session_by_creating_it(alice):
    session = session_set_system_prompt(
        tenant_id=alice.tenant.pk, external_id="new", system_prompt="hello"
    )
    again = session_set_system_prompt(
        tenant_id=alice.tenant.pk, external_id="new", system_prompt="changed"
    )

    assert again.pk == session.pk
    assert ChatSession.objects.get(pk=session.pk).system_prompt == "changed"


@pytest.mark.django_db
def test_it_sets_the_tenants_default_system_prompt(alice, bob):
    tenant_set_system_prompt(tenant_id=alice.tenant.pk, system_prompt="be kind")

    alice.tenant.refresh_from_db()
    bob.tenant.refresh_from_db()
    assert (alice.tenant.system_prompt, bob.tenant.system_prompt) == ("be kind", "")


# --- recording turns -----------------------------------------------------------------


@pytest.mark.django_db
def test_it_records_new_messages_then_the_reply_with_metrics(alice):
    pk = load(alice.tenant).session_pk
    t0 = timezone.now()
    metrics = TurnMetrics(
        prompt_tokens=120,
        cached_tokens=100,
        pp_tokens=20,
        pp_started_at=t0,
        pp_finished_at=t0 + timedelta(seconds=0.5),
        tg_tokens=11,
        tg_started_at=t0 + timedelta(seconds=0.5),
        tg_finished_at=t0 + timedelta(seconds=1.5),
    )
    new = [
        {"role": "system", "content": "client system"},
        user("look at this"),
        {"role": "tool", "tool_call_id": "c1", "content": "result"},
    ]

    turn_record(
        session_pk=pk,
        new_messages=new,
        reply=reply("seen"),
        model="fake-model",
        metrics=metrics,
        token_counts={0: 4, 1: 9, 2: 3},
    )

    rows = list(Message.objects.filter(session_id=pk).order_by("position"))
    assert [(m.position, m.role, m.tokens) for m in rows] == [
        (0, "user", 9),
        (1, "tool", 3),
        (2, "assistant", 11),
    ]
    assert rows[0].payload == user("look at this")
    assert rows[0].prompt_tokens is None
    assert rows[0].tg_started_at is None
    answer = rows[2]
    assert (answer.prompt_tokens, answer.cached_tokens, answer.pp_tokens) == (120, 100, 20)
    assert (answer.model, answer.tg_tokens) == ("fake-model", 11)
    assert answer.pp_tokens_per_second == pytest.approx(40.0)
    assert answer.tg_tokens_per_second == pytest.approx(10.0)


@pytest.mark.django_db
def test_it_appends_after_the_last_position(alice):
    pk = load(alice.tenant).session_pk
    record(pk, "q1", "a1")
    Message.objects.filter(session_id=pk, position=0).delete()  # a gap must not matter

    record(pk, "q2", "a2")

    positions = list(
        Message.objects.filter(session_id=pk).order_by("position").values_list("position", "role")
    )
    assert positions == [(1, "assistant"), (2, "user"), (3, "assistant")]


@pytest.mark.django_db
def test_it_stores_nothing_when_there_is_no_reply(alice):
    pk = load(alice.tenant).session_pk

    record(pk, "lost question", None)

    assert not Message.objects.exists()


@pytest.mark.django_db
def test_it_writes_nothing_when_the_insert_fails(alice):
    pk = load(alice.tenant).session_pk
    record(pk, "q1", "a1")
    before = ChatSession.objects.get(pk=pk).last_active_at

    with pytest.raises(TypeError):
        turn_record(
            session_pk=pk,
            new_messages=[user("fine"), {"role": "user", "content": {1, 2}}],  # not JSON
            reply=reply("never stored"),
            model="m",
            metrics=NO_METRICS,
        )

    assert Message.objects.filter(session_id=pk).count() == 2
    assert ChatSession.objects.get(pk=pk).last_active_at == before


@pytest.mark.django_db
def test_it_drops_a_turn_for_a_session_deleted_meanwhile(alice):
    pk = load(alice.tenant).session_pk
    session_delete(tenant_id=alice.tenant.pk, external_id="chat-1")

    record(pk, "q", "a")

    assert not Message.objects.exists()


@pytest.mark.django_db
def test_it_records_a_turn_in_a_constant_number_of_queries(alice, django_assert_max_num_queries):
    pk = load(alice.tenant).session_pk
    new = [user(str(i)) for i in range(20)]

    # savepoint + UPDATE (lock) + MAX(position) + one INSERT + release
    with django_assert_max_num_queries(5):
        turn_record(
            session_pk=pk, new_messages=new, reply=reply("ok"), model="m", metrics=NO_METRICS
        )

    assert Message.objects.filter(session_id=pk).count() == 21


# --- concurrency (real commits, real threads) ----------------------------------------


def run_in_threads(count: int, work: Callable[[int], Any]) -> list[Any]:
    """Run `work(i)` in `count` threads released at once; re-raise the first failure."""
    barrier = threading.Barrier(count)
    results: list[Any] = [None] * count
    errors: list[BaseException] = []

    def target(i: int) -> None:
        try:
            barrier.wait()
            results[i] = work(i)
        except BaseException as err:
            errors.append(err)
        finally:
            connection.close()  # each thread has its own connection; let the test DB drop

    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    if errors:
        raise errors[0]
    return results


@pytest.mark.django_db(transaction=True)
def test_it_survives_concurrent_first_requests_for_a_new_id(alice):
    for attempt in range(5):
        external_id = f"race-{attempt}"

        contexts = run_in_threads(8, lambda _, eid=external_id: load(alice.tenant, eid))

        assert len({c.session_pk for c in contexts}) == 1
        assert ChatSession.objects.filter(external_id=external_id).count() == 1


@pytest.mark.django_db(transaction=True)
def test_it_serialises_concurrent_turns_of_one_session(alice):
    pk = load(alice.tenant).session_pk

    run_in_threads(6, lambda i: record(pk, f"q{i}", f"a{i}"))

    rows = list(Message.objects.filter(session_id=pk).order_by("position"))
    assert [m.position for m in rows] == list(range(12))
    # Each turn is contiguous: a question is always followed by its own answer.
    for question, answer in zip(rows[::2], rows[1::2], strict=True):
        assert answer.payload["content"] == "a" + question.payload["content"][1:]


@pytest.mark.django_db(transaction=True)
def test_it_records_batches_that_list_the_same_sessions_in_any_order(alice):
    """Each batch locks its sessions in session id order, whatever order its turns came
    in: batches naming the same sessions the other way round never deadlock."""
    pks = [load(alice.tenant, f"pair-{i}").session_pk for i in range(2)]

    def turns(i: int) -> None:
        for round_ in range(10):
            order = pks if (i + round_) % 2 else pks[::-1]
            batch = [
                store.turn_item(
                    session_pk=pk, new_messages=[user(f"q{i}.{round_}")],
                    reply=reply(f"a{i}.{round_}"), model="m", metrics=NO_METRICS,
                    token_counts={}, reply_tokens=None,
                )
                for pk in order
            ]  # fmt: skip
            with connection.cursor() as cursor:
                cursor.execute(store.RECORD_SQL, [orjson.dumps(batch).decode()])

    run_in_threads(4, turns)

    for pk in pks:
        rows = list(Message.objects.filter(session_id=pk).order_by("position"))
        assert [m.position for m in rows] == list(range(80))
        assert all(a.payload["content"] == "a" + q.payload["content"][1:]
                   for q, a in zip(rows[::2], rows[1::2], strict=True))  # fmt: skip


# --- the history the open leaves out (migration 0006) -----------------------------------


def capped_history(tenant: Any, cap: int | None) -> list[dict[str, Any]]:
    return payloads(capped(tenant, cap))


def capped(tenant: Any, cap: int | None) -> StoredHistory:
    row = store.open_now(store.open_item(tenant_id=tenant.pk, external_id="chat-1", cap=cap))
    return store.context_parts(row, variant_system_prompt="")[2]


def five_turns_of_twenty_tokens(tenant: Any) -> int:
    pk = load(tenant).session_pk
    for i in range(1, 6):
        record(pk, f"q{i}", f"a{i}", token_counts={0: 10}, reply_tokens=10)
    return pk


@pytest.mark.django_db
def test_it_leaves_out_the_turns_that_cannot_fit_the_cap(alice):
    five_turns_of_twenty_tokens(alice.tenant)

    history = capped_history(alice.tenant, cap=45)

    # From the newest: a5 10, q5 20, a4 30, q4 40, a3 50: the last turn start within 45 is q4.
    assert history == [user("q4"), reply("a4"), user("q5"), reply("a5")]


@pytest.mark.django_db
def test_it_returns_the_whole_history_without_a_cap_or_when_it_fits(alice):
    five_turns_of_twenty_tokens(alice.tenant)

    assert len(capped_history(alice.tenant, cap=None)) == 10
    assert len(capped_history(alice.tenant, cap=100)) == 10
    assert capped_history(alice.tenant, cap=5) == []  # not even the newest turn fits


@pytest.mark.django_db
def test_it_counts_messages_stored_without_a_count_as_nothing(alice):
    pk = five_turns_of_twenty_tokens(alice.tenant)
    record(pk, "q6", "a6")  # no counts: the cut must not drop what trimming might keep

    history = capped_history(alice.tenant, cap=45)

    assert [m["content"] for m in history] == ["q4", "a4", "q5", "a5", "q6", "a6"]


@pytest.mark.django_db
@pytest.mark.parametrize("budget", [5, 19, 20, 39, 40, 41, 60, 100])
def test_it_sends_what_trimming_the_whole_history_would_send(alice, budget):
    five_turns_of_twenty_tokens(alice.tenant)

    def build(history: StoredHistory) -> list[dict[str, Any]]:
        kept = history_trim(history, fixed_tokens=0, budget_tokens=budget)
        return messages_with_history([], kept)

    assert build(capped(alice.tenant, cap=budget)) == build(load(alice.tenant).history)


# --- the history as text, cut into units (migration 0007) ---------------------------------


def record_messages(session_pk: int, messages: list[dict[str, Any]], answer: str, **kw) -> None:
    turn_record(
        session_pk=session_pk,
        new_messages=messages,
        reply=reply(answer),
        model="m",
        metrics=NO_METRICS,
        **kw,
    )


TOOL_CALL = {
    "role": "assistant",
    "content": None,
    "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": 1}'}}
    ],
}


@pytest.mark.django_db
def test_it_cuts_the_history_into_turns_that_start_at_a_user_message(alice):
    pk = load(alice.tenant).session_pk
    orphan = {"role": "tool", "tool_call_id": "x", "content": "r"}
    result = {"role": "tool", "tool_call_id": "c1", "content": "found"}
    record_messages(pk, [orphan], "before any question", token_counts={0: 3}, reply_tokens=2)
    record_messages(pk, [user("ask"), TOOL_CALL, result], "done", token_counts={0: 5, 1: 7, 2: 1},
                    reply_tokens=4)  # fmt: skip
    record(pk, "next", "ok", token_counts={0: 6}, reply_tokens=6)

    history = load(alice.tenant).history

    assert history.unit_messages == (2, 4, 2)
    assert history.unit_tokens == (5, 17, 12)
    # Dropping the oldest turns drops each whole: a tool call with its results and reply.
    assert payloads(history, 1) == [user("ask"), TOOL_CALL, result, reply("done"),
                                    user("next"), reply("ok")]  # fmt: skip
    assert payloads(history, 2) == [user("next"), reply("ok")]
    assert payloads(history, 3) == []


@pytest.mark.parametrize(
    "message",
    [
        user("short"),
        user(""),
        user("x" * 4001),
        user("你好 世界 😀"),
        {
            "role": "user",
            "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}],
        },
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]},
        TOOL_CALL,
        {"role": "assistant", "content": "let me look", "tool_calls": TOOL_CALL["tool_calls"] * 2},
        {"role": "tool", "tool_call_id": "c1", "content": None},
    ],
)
@pytest.mark.django_db
def test_it_estimates_a_message_stored_without_a_count_as_the_gateway_does(alice, message):
    pk = load(alice.tenant).session_pk
    record_messages(pk, [user("q")], "a", token_counts={0: 0}, reply_tokens=0)
    Message.objects.filter(session_id=pk, position=1).update(payload=message, tokens=None)

    assert load(alice.tenant).history.unit_tokens == (heuristic_message_tokens(message),)


@pytest.mark.django_db
def test_it_returns_stored_text_byte_exact_and_cuts_it_at_utf8_offsets(alice):
    pk = load(alice.tenant).session_pk
    tricky = user('é "quoted" \\ back\\slash \n new line \ufffd 😀 你好 \u2028')
    record_messages(pk, [tricky], 'ß "ok"', token_counts={0: 1}, reply_tokens=1)
    record(pk, "second", "fine", token_counts={0: 1}, reply_tokens=1)

    history = load(alice.tenant).history

    assert payloads(history) == [tricky, reply('ß "ok"'), user("second"), reply("fine")]
    assert payloads(history, 1) == [user("second"), reply("fine")]
    assert history.media is False


@pytest.mark.django_db
def test_it_flags_a_history_with_non_text_parts(alice):
    pk = load(alice.tenant).session_pk
    text_parts = {"role": "user", "content": [{"type": "text", "text": "only text"}]}
    record_messages(pk, [text_parts], "a")
    assert load(alice.tenant).history.media is False

    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}
    record_messages(pk, [image], "b")

    assert load(alice.tenant).history.media is True
