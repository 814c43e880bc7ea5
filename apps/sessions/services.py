"""Writes for chat sessions, and the API the /v1 pipeline calls (sync; wrap it in
database_sync_to_async). The pure helpers live in prompts.py and session_ids.py and are
re-exported here so the pipeline has a single module to import from."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from apps.core.session_ids import SESSION_ID_RE, InvalidSessionId, session_id_from_request
from apps.sessions import store
from apps.sessions.models import ChatSession
from apps.sessions.prompts import (
    StoredHistory,
    history_trim,
    prompt_head,
    system_prompt_resolve,
)
from apps.tenants.models import Tenant

__all__ = [
    "SESSION_ID_RE",
    "InvalidSessionId",
    "SessionContext",
    "StoredHistory",
    "TurnMetrics",
    "history_trim",
    "prompt_head",
    "session_context_load",
    "session_delete",
    "session_id_from_request",
    "session_set_system_prompt",
    "system_prompt_resolve",
    "tenant_set_system_prompt",
    "turn_record",
]


@dataclass(frozen=True)
class SessionContext:
    session_pk: int
    system_prompt: str
    history: StoredHistory


@dataclass(frozen=True)
class TurnMetrics:
    """What the engine reported for the request that produced an assistant reply."""

    prompt_tokens: int
    cached_tokens: int
    pp_tokens: int
    pp_started_at: datetime | None
    pp_finished_at: datetime | None
    tg_tokens: int
    tg_started_at: datetime | None
    tg_finished_at: datetime | None


def session_context_load(
    *, tenant_id: int, external_id: str, variant_system_prompt: str
) -> SessionContext:
    """The tenant's session (created on first use), its system prompt and its history."""
    row = store.open_now(store.open_item(tenant_id=tenant_id, external_id=external_id))
    return session_context(row, variant_system_prompt=variant_system_prompt)


def session_context(
    row: store.OpenRow, *, variant_system_prompt: str, history: StoredHistory | None = None
) -> SessionContext:
    session_pk, system_prompt, history = store.context_parts(
        row, variant_system_prompt=variant_system_prompt, history=history
    )
    return SessionContext(session_pk=session_pk, system_prompt=system_prompt, history=history)


def turn_record(
    *,
    session_pk: int,
    new_messages: list[dict[str, Any]],
    reply: dict[str, Any] | None,
    model: str,
    metrics: TurnMetrics,
    token_counts: dict[int, int] | None = None,
    reply_tokens: int | None = None,
) -> None:
    """Append the client's new (non-system) messages and the reply, all or nothing.

    No reply (the request failed before any output) stores nothing, so history never
    holds a question without its answer. A session deleted meanwhile takes no turn.
    Concurrent turns of one session are serialised by its row lock.
    """
    if reply is None:
        return
    store.record_now(
        store.turn_item(
            session_pk=session_pk,
            new_messages=new_messages,
            reply=reply,
            model=model,
            metrics=metrics,
            token_counts=token_counts or {},
            reply_tokens=reply_tokens,
        )
    )


def session_delete(*, tenant_id: int, external_id: str) -> bool:
    """Delete the tenant's session and its messages; False if it has no such session."""
    deleted, _ = ChatSession.objects.filter(tenant_id=tenant_id, external_id=external_id).delete()
    return deleted > 0


def session_set_system_prompt(
    *, tenant_id: int, external_id: str, system_prompt: str
) -> ChatSession:
    """Set a session's own system prompt, creating the session if it does not exist yet."""
    session, _ = ChatSession.objects.update_or_create(
        tenant_id=tenant_id, external_id=external_id, defaults={"system_prompt": system_prompt}
    )
    return session


def tenant_set_system_prompt(*, tenant_id: int, system_prompt: str) -> None:
    Tenant.objects.filter(pk=tenant_id).update(system_prompt=system_prompt)
