"""Server-side chat history: a tenant's sessions and their messages, in order."""

from __future__ import annotations

from datetime import datetime

from django.db import models
from django.utils import timezone


class ChatSession(models.Model):
    """One conversation, named by the client (`X-Session-Id`), private to its tenant."""

    # Indexed only by the unique (tenant, external_id) index, which starts with it. Any
    # other index costs a write per new session, and one on last_active_at one per turn
    # too (no HOT update); a plan made for a tiny table used such an index to find a
    # session by external id, reading every session of the tenant (sessions 0004, 0005).
    tenant = models.ForeignKey(
        "tenants.Tenant", on_delete=models.CASCADE, related_name="chat_sessions", db_index=False
    )
    external_id = models.CharField(max_length=128, help_text="The id the client sends.")
    system_prompt = models.TextField(
        blank=True,
        help_text="System prompt for this session only (overrides the model's and the tenant's).",
    )
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    last_active_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        verbose_name = "chat session"
        ordering = ["-last_active_at", "-pk"]
        constraints = [
            models.UniqueConstraint(
                fields=["tenant", "external_id"], name="unique_session_per_tenant"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.tenant_id}/{self.external_id}"


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return (end - start).total_seconds()


class Message(models.Model):
    """One turn as the OpenAI API carries it; assistant turns also carry engine metrics."""

    # The (session, position) unique index already serves lookups by session.
    session = models.ForeignKey(
        ChatSession, on_delete=models.CASCADE, related_name="messages", db_index=False
    )
    position = models.PositiveIntegerField(help_text="Order within the session.")
    role = models.CharField(max_length=16)
    payload = models.JSONField(help_text="The whole OpenAI message, as sent or received.")
    tokens = models.PositiveIntegerField(
        null=True,
        blank=True,
        help_text="Tokens of this message incl. chat-template overhead; empty when unknown.",
    )
    model = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    # Engine metrics of the request that produced an assistant message (empty otherwise).
    prompt_tokens = models.PositiveIntegerField(null=True, blank=True)
    cached_tokens = models.PositiveIntegerField(null=True, blank=True)
    pp_tokens = models.PositiveIntegerField(
        null=True, blank=True, help_text="Prompt tokens actually processed (not from cache)."
    )
    pp_started_at = models.DateTimeField(null=True, blank=True)
    pp_finished_at = models.DateTimeField(null=True, blank=True)
    tg_tokens = models.PositiveIntegerField(null=True, blank=True)
    tg_started_at = models.DateTimeField(null=True, blank=True, help_text="First token.")
    tg_finished_at = models.DateTimeField(null=True, blank=True, help_text="Last token.")

    class Meta:
        ordering = ["session", "position"]
        constraints = [
            models.UniqueConstraint(fields=["session", "position"], name="unique_message_position"),
        ]

    def __str__(self) -> str:
        return f"{self.role} #{self.position}"

    @property
    def pp_seconds(self) -> float | None:
        return _seconds(self.pp_started_at, self.pp_finished_at)

    @property
    def tg_seconds(self) -> float | None:
        return _seconds(self.tg_started_at, self.tg_finished_at)

    @property
    def pp_tokens_per_second(self) -> float | None:
        seconds = self.pp_seconds
        if not self.pp_tokens or not seconds or seconds <= 0:
            return None
        return self.pp_tokens / seconds

    @property
    def tg_tokens_per_second(self) -> float | None:
        # tg_started_at is the first token's arrival, so the interval spans the other
        # tg_tokens - 1 tokens; counting the first one too would overstate the rate.
        seconds = self.tg_seconds
        if self.tg_tokens is None or self.tg_tokens < 2 or not seconds or seconds <= 0:
            return None
        return (self.tg_tokens - 1) / seconds
