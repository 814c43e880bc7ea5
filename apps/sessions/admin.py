"""Admin pages for chat sessions (system prompt editable) and messages (read-only)."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.db.models import Count, QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html

from apps.core.admin import ReadOnlyAdminMixin
from apps.sessions.models import ChatSession, Message

PREVIEW_CHARS = 120


def message_text(payload: dict[str, Any]) -> str:
    """A one-line rendering of an OpenAI message: its text, or the tools it calls."""
    content = payload.get("content")
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        text = " ".join(
            str(part.get("text", f"[{part.get('type', '?')}]"))
            for part in content
            if isinstance(part, dict)
        )
    else:
        text = ""
    if not text and payload.get("tool_calls"):
        names = [str(call.get("function", {}).get("name", "?")) for call in payload["tool_calls"]]
        text = "calls " + ", ".join(names)
    return " ".join(text.split())


def _preview(payload: dict[str, Any]) -> str:
    text = message_text(payload)
    return text if len(text) <= PREVIEW_CHARS else text[: PREVIEW_CHARS - 1] + "…"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _duration(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.3f} s"


class MessageMetrics:
    """Display columns shared by the inline and the message list."""

    @admin.display(description="content")
    def content_preview(self, obj: Message) -> str:
        return _preview(obj.payload)

    @admin.display(description="pp time")
    def pp_time(self, obj: Message) -> str:
        return _duration(obj.pp_seconds)

    @admin.display(description="pp tok/s")
    def pp_speed(self, obj: Message) -> str:
        return _rate(obj.pp_tokens_per_second)

    @admin.display(description="tg time")
    def tg_time(self, obj: Message) -> str:
        return _duration(obj.tg_seconds)

    @admin.display(description="tg tok/s")
    def tg_speed(self, obj: Message) -> str:
        return _rate(obj.tg_tokens_per_second)


METRIC_COLUMNS = [
    "tokens",
    "prompt_tokens",
    "cached_tokens",
    "pp_tokens",
    "pp_time",
    "pp_speed",
    "tg_tokens",
    "tg_time",
    "tg_speed",
]


class MessageInline(ReadOnlyAdminMixin, MessageMetrics, admin.TabularInline):
    model = Message
    fields = ["position", "role", "content_preview", *METRIC_COLUMNS, "model", "created_at"]
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = True


@admin.register(ChatSession)
class ChatSessionAdmin(admin.ModelAdmin):
    list_display = ["external_id", "tenant", "message_count", "last_active_at", "created_at"]
    list_filter = ["tenant"]
    list_select_related = ["tenant"]
    search_fields = ["external_id", "tenant__slug"]
    fields = [
        "tenant",
        "external_id",
        "system_prompt",
        "created_at",
        "last_active_at",
        "messages_link",
    ]
    readonly_fields = ["tenant", "external_id", "created_at", "last_active_at", "messages_link"]
    inlines = [MessageInline]
    show_full_result_count = False

    def get_queryset(self, request: HttpRequest) -> QuerySet[ChatSession]:
        return super().get_queryset(request).annotate(num_messages=Count("messages"))

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[ChatSession], search_term: str
    ) -> tuple[QuerySet[ChatSession], bool]:
        """Also match message text. A subquery instead of a join: no duplicate rows to
        remove, and the message counts stay right."""
        matches, may_have_duplicates = super().get_search_results(request, queryset, search_term)
        term = search_term.strip()
        if term:
            in_messages = Message.objects.filter(payload__content__icontains=term)
            matches |= queryset.filter(pk__in=in_messages.values("session_id"))
        return matches, may_have_duplicates

    @admin.display(description="messages", ordering="num_messages")
    def message_count(self, obj: ChatSession) -> int:
        return obj.num_messages

    @admin.display(description="all messages")
    def messages_link(self, obj: ChatSession) -> str:
        url = reverse("admin:chat_sessions_message_changelist")
        return format_html('<a href="{}?session__id__exact={}">message list</a>', url, obj.pk)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # sessions come from traffic (or the tenant API)


@admin.register(Message)
class MessageAdmin(ReadOnlyAdminMixin, MessageMetrics, admin.ModelAdmin):
    """Read-only: messages are written by the gateway; superusers may delete old ones."""

    superusers_may_delete = True

    list_display = [
        "created_at",
        "session_id_display",
        "tenant",
        "position",
        "role",
        "content_preview",
        "model",
        *METRIC_COLUMNS,
    ]
    list_filter = ["role", "model"]
    list_select_related = ["session__tenant"]
    search_fields = ["session__external_id"]
    show_full_result_count = False

    @admin.display(description="session", ordering="session__external_id")
    def session_id_display(self, obj: Message) -> str:
        return obj.session.external_id

    @admin.display(description="tenant", ordering="session__tenant__slug")
    def tenant(self, obj: Message) -> str:
        return obj.session.tenant.slug
