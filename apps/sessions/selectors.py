"""Reads for the tenant API."""

from __future__ import annotations

from django.db.models import Count, Prefetch, QuerySet

from apps.sessions.models import ChatSession, Message


def _with_counts(tenant_id: int) -> QuerySet[ChatSession]:
    return ChatSession.objects.filter(tenant_id=tenant_id).annotate(message_count=Count("messages"))


def session_list(*, tenant_id: int, limit: int, offset: int = 0) -> list[ChatSession]:
    """The tenant's sessions, latest activity first, each with `message_count`."""
    sessions = _with_counts(tenant_id).order_by("-last_active_at", "-pk")
    return list(sessions[offset : offset + limit])


def session_summary(*, tenant_id: int, external_id: str) -> ChatSession | None:
    """The tenant's session with `message_count`; None if the tenant has no such session."""
    return _with_counts(tenant_id).filter(external_id=external_id).first()


def session_get(*, tenant_id: int, external_id: str) -> ChatSession | None:
    """The tenant's session with its messages prefetched in order; None if it has none such."""
    ordered: QuerySet[Message] = Message.objects.order_by("position")
    return (
        ChatSession.objects.filter(tenant_id=tenant_id, external_id=external_id)
        .prefetch_related(Prefetch("messages", queryset=ordered))
        .first()
    )
