"""Admin pages for chat sessions and messages: they render, search, stay read-only, and
cost a constant number of queries."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from apps.sessions.admin import message_text
from apps.sessions.models import ChatSession, Message
from apps.sessions.services import TurnMetrics, session_context_load, turn_record

pytestmark = pytest.mark.django_db

T0 = timezone.now()
METRICS = TurnMetrics(
    prompt_tokens=40,
    cached_tokens=8,
    pp_tokens=32,
    pp_started_at=T0,
    pp_finished_at=T0 + timedelta(seconds=0.25),
    tg_tokens=21,
    tg_started_at=T0 + timedelta(seconds=0.25),
    tg_finished_at=T0 + timedelta(seconds=2.25),
)


def url(model: type, view: str, *args: Any) -> str:
    return reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_{view}", args=args)


def chat(tenant: Any, external_id: str, turns: int = 1, text: str = "hello") -> ChatSession:
    pk = session_context_load(
        tenant_id=tenant.pk, external_id=external_id, variant_system_prompt=""
    ).session_pk
    for i in range(turns):
        turn_record(
            session_pk=pk,
            new_messages=[{"role": "user", "content": f"{text} {i}"}],
            reply={"role": "assistant", "content": f"reply {i}"},
            model="fake-model",
            metrics=METRICS,
        )
    return ChatSession.objects.get(pk=pk)


def listed(response: Any) -> list[Any]:
    return list(response.context["cl"].result_list)


# --- pages render --------------------------------------------------------------------


def test_it_renders_the_session_pages(admin_client: Client, alice):
    session = chat(alice.tenant, "chat-1", turns=2)

    changelist = admin_client.get(url(ChatSession, "changelist"))
    change = admin_client.get(url(ChatSession, "change", session.pk))

    assert changelist.status_code == 200
    assert listed(changelist)[0].num_messages == 4
    assert change.status_code == 200
    page = change.content.decode()
    assert "hello 0" in page
    assert "reply 1" in page
    assert "128.0" in page  # pp tok/s: 32 tokens in 0.25 s
    assert "10.0" in page  # tg tok/s: 20 tokens after the first, in 2 s
    assert f"session__id__exact={session.pk}" in page


def test_it_renders_the_message_pages(admin_client: Client, alice):
    chat(alice.tenant, "chat-1")
    message = Message.objects.get(role="assistant")

    changelist = admin_client.get(url(Message, "changelist"))
    change = admin_client.get(url(Message, "change", message.pk))

    assert changelist.status_code == 200
    assert change.status_code == 200
    assert "chat-1" in changelist.content.decode()


def test_it_filters_messages_by_session_role_and_model(admin_client: Client, alice):
    one = chat(alice.tenant, "one")
    chat(alice.tenant, "two")
    changelist = url(Message, "changelist")

    by_session = admin_client.get(changelist, {"session__id__exact": one.pk})
    by_role = admin_client.get(changelist, {"role": "assistant"})
    by_model = admin_client.get(changelist, {"model": "fake-model"})

    assert {m.session_id for m in listed(by_session)} == {one.pk}
    assert {m.role for m in listed(by_role)} == {"assistant"}
    assert len(listed(by_model)) == 4


def test_it_filters_sessions_by_tenant(admin_client: Client, alice, bob):
    chat(alice.tenant, "a")
    chat(bob.tenant, "b")

    response = admin_client.get(
        url(ChatSession, "changelist"), {"tenant__id__exact": bob.tenant.pk}
    )

    assert [s.external_id for s in listed(response)] == ["b"]


# --- search --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("term", "expected"),
    [("chat-a", {"chat-a"}), ("bob", {"chat-b"}), ("PINEAPPLE", {"chat-a"}),
     ("reply", {"chat-a", "chat-b"}), ("nothing-matches", set())],
)  # fmt: skip
def test_it_searches_sessions_by_id_tenant_and_message_text(
    admin_client: Client, alice, bob, term, expected
):
    chat(alice.tenant, "chat-a", turns=3, text="I like pineapple")
    chat(bob.tenant, "chat-b", turns=1, text="plain")

    response = admin_client.get(url(ChatSession, "changelist"), {"q": term})

    assert response.status_code == 200
    assert {s.external_id for s in listed(response)} == expected
    # A text match over many messages neither duplicates the row nor inflates the count.
    counts = {s.external_id: s.num_messages for s in listed(response)}
    assert counts.get("chat-a", 6) == 6


def test_it_searches_text_inside_content_parts(admin_client: Client, alice):
    session = chat(alice.tenant, "parts", turns=0)
    turn_record(
        session_pk=session.pk,
        new_messages=[{"role": "user", "content": [{"type": "text", "text": "find the Kiwi"}]}],
        reply={"role": "assistant", "content": "ok"},
        model="m",
        metrics=METRICS,
    )

    response = admin_client.get(url(ChatSession, "changelist"), {"q": "kiwi"})

    assert [s.external_id for s in listed(response)] == ["parts"]


# --- read-only -----------------------------------------------------------------------


def test_it_keeps_messages_read_only(admin_client: Client, alice):
    session = chat(alice.tenant, "chat-1")
    message = Message.objects.first()

    assert admin_client.get(url(Message, "add")).status_code == 403
    assert admin_client.get(url(ChatSession, "add")).status_code == 403
    response = admin_client.post(url(Message, "change", message.pk), {"role": "system"})
    assert response.status_code == 403
    change = admin_client.get(url(ChatSession, "change", session.pk))
    assert 'name="messages-0-role"' not in change.content.decode()


def test_it_lets_operators_edit_a_sessions_system_prompt(admin_client: Client, alice):
    session = chat(alice.tenant, "chat-1")

    response = admin_client.post(
        url(ChatSession, "change", session.pk),
        {
            "system_prompt": "Answer in French.",
            "messages-TOTAL_FORMS": "2",
            "messages-INITIAL_FORMS": "2",
            "messages-MIN_NUM_FORMS": "0",
            "messages-MAX_NUM_FORMS": "1000",
        },
    )

    assert response.status_code == 302, response.context and response.context["errors"]
    session.refresh_from_db()
    assert session.system_prompt == "Answer in French."
    assert (session.external_id, session.tenant_id) == ("chat-1", alice.tenant.pk)
    assert Message.objects.filter(session=session).count() == 2


# --- query counts --------------------------------------------------------------------


def queries_for(client: Client, path: str, assert_max: Any, limit: int) -> None:
    with assert_max(limit):
        assert client.get(path).status_code == 200


def test_it_lists_sessions_in_constant_queries(
    admin_client: Client, alice, bob, django_assert_max_num_queries
):
    for i in range(12):
        chat(alice.tenant if i % 2 else bob.tenant, f"s{i}", turns=2)

    queries_for(admin_client, url(ChatSession, "changelist"), django_assert_max_num_queries, 6)
    queries_for(
        admin_client,
        url(ChatSession, "changelist") + "?q=hello",
        django_assert_max_num_queries,
        6,
    )


def test_it_shows_a_long_session_in_constant_queries(
    admin_client: Client, alice, django_assert_max_num_queries
):
    session = chat(alice.tenant, "long", turns=25)

    queries_for(
        admin_client, url(ChatSession, "change", session.pk), django_assert_max_num_queries, 6
    )


def test_it_lists_messages_in_constant_queries(
    admin_client: Client, alice, bob, django_assert_max_num_queries
):
    for i in range(6):
        chat(alice.tenant if i % 2 else bob.tenant, f"s{i}", turns=4)

    queries_for(admin_client, url(Message, "changelist"), django_assert_max_num_queries, 6)
    message = Message.objects.last()
    queries_for(admin_client, url(Message, "change", message.pk), django_assert_max_num_queries, 6)


# --- previews ------------------------------------------------------------------------


def test_it_previews_text_parts_and_tool_calls():
    assert message_text({"content": "  many\n\nlines  "}) == "many lines"
    parts = [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {}}]
    assert message_text({"content": parts}) == "look [image_url]"
    call = {"function": {"name": "get_weather", "arguments": "{}"}}
    assert message_text({"content": None, "tool_calls": [call]}) == "calls get_weather"
    assert message_text({}) == ""
