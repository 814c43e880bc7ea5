"""Writes for chat sessions, and the API the /v1 pipeline calls (sync; wrap it in
database_sync_to_async). The pure helpers live in prompts.py and session_ids.py and are
re-exported here so the pipeline has a single module to import from."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db import transaction
from django.db.models import Max
from django.utils import timezone

from apps.sessions.models import ChatSession, Message
from apps.sessions.prompts import SYSTEM_ROLES, StoredMessage, prompt_build, system_prompt_resolve
from apps.sessions.session_ids import SESSION_ID_RE, InvalidSessionId, session_id_from_request
from apps.tenants.models import Tenant

__all__ = [
    "SESSION_ID_RE",
    "InvalidSessionId",
    "SessionContext",
    "StoredMessage",
    "TurnMetrics",
    "prompt_build",
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
    history: list[StoredMessage]


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
    # get_or_create inserts in a savepoint and, on IntegrityError from the unique
    # (tenant, external_id) constraint, reads the row the concurrent request created.
    session, created = ChatSession.objects.select_related("tenant").get_or_create(
        tenant_id=tenant_id, external_id=external_id
    )
    if not created:
        ChatSession.objects.filter(pk=session.pk).update(last_active_at=timezone.now())
    system_prompt = system_prompt_resolve(
        tenant_system_prompt=session.tenant.system_prompt,
        variant_system_prompt=variant_system_prompt,
        session_system_prompt=session.system_prompt,
    )
    history = [] if created else _history(session_pk=session.pk)
    return SessionContext(session_pk=session.pk, system_prompt=system_prompt, history=history)


def _history(*, session_pk: int) -> list[StoredMessage]:
    rows = Message.objects.filter(session_id=session_pk).order_by("position")
    return [
        StoredMessage(payload=payload, tokens=tokens)
        for payload, tokens in rows.values_list("payload", "tokens")
    ]


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
    """
    if reply is None:
        return
    token_counts = token_counts or {}
    now = timezone.now()
    with transaction.atomic():
        # The UPDATE takes the same row lock select_for_update would, serialising
        # concurrent turns of this session, and bumps last_active_at in one statement.
        if not ChatSession.objects.filter(pk=session_pk).update(last_active_at=now):
            return
        last = Message.objects.filter(session_id=session_pk).aggregate(last=Max("position"))
        position = (last["last"] + 1) if last["last"] is not None else 0
        rows = [
            _message(payload=payload, tokens=token_counts.get(index), model=model, now=now)
            for index, payload in enumerate(new_messages)
            if payload.get("role") not in SYSTEM_ROLES
        ]
        rows.append(
            _reply(payload=reply, model=model, metrics=metrics, now=now, tokens=reply_tokens)
        )
        for offset, row in enumerate(rows):
            row.session_id, row.position = session_pk, position + offset
        Message.objects.bulk_create(rows)


def _message(*, payload: dict[str, Any], tokens: int | None, model: str, now: datetime) -> Message:
    # The column is short; a longer (odd) role is still kept whole in the payload.
    role = str(payload.get("role") or "")[:16]
    payload = storable(payload)
    return Message(role=role, payload=payload, tokens=tokens, model=model, created_at=now)


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


def _reply(
    *, payload: dict[str, Any], model: str, metrics: TurnMetrics, now: datetime, tokens: int | None
) -> Message:
    """The assistant's message; its size in history is `tokens` (default: what it generated)."""
    payload = {"role": "assistant", **payload}
    tokens = metrics.tg_tokens if tokens is None else tokens
    message = _message(payload=payload, tokens=tokens, model=model, now=now)
    message.prompt_tokens = metrics.prompt_tokens
    message.cached_tokens = metrics.cached_tokens
    message.pp_tokens = metrics.pp_tokens
    message.pp_started_at = metrics.pp_started_at
    message.pp_finished_at = metrics.pp_finished_at
    message.tg_tokens = metrics.tg_tokens
    message.tg_started_at = metrics.tg_started_at
    message.tg_finished_at = metrics.tg_finished_at
    return message


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
