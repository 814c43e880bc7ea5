"""The audit trail, written off the hot path.

A request only appends its events to an in-memory buffer; a background task writes the
buffer with one bulk INSERT every SAFETY_EVENT_FLUSH_SECONDS (and once more at shutdown),
as the request logs are written.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from channels.db import database_sync_to_async
from django.conf import settings
from django.utils import timezone

from apps.observability import metrics
from apps.safety.checks import Finding
from apps.safety.models import SafetyEvent, SafetyRule

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EventScope:
    """Who and which request an event belongs to."""

    tenant_id: int
    api_key_id: int | None
    session_id: str
    request_id: str


def event_of(*, scope: EventScope, stage: str, finding: Finding) -> SafetyEvent:
    return SafetyEvent(
        created_at=timezone.now(),
        tenant_id=scope.tenant_id,
        api_key_id=scope.api_key_id,
        session_id=scope.session_id[:200],
        request_id=scope.request_id,
        stage=stage,
        rule_id=finding.rule.id or None,
        rule_name=finding.rule.name,
        action=finding.action,
        categories=",".join(finding.categories)[:100],
        excerpt=finding.excerpt[:200],
        detail=finding.detail[:300],
    )


def _write(events: list[SafetyEvent]) -> None:
    # A rule deleted meanwhile: keep the event, by name only.
    rule_ids = {event.rule_id for event in events if event.rule_id}
    if rule_ids:
        alive = set(SafetyRule.objects.filter(pk__in=rule_ids).values_list("pk", flat=True))
        for event in events:
            if event.rule_id not in alive:
                event.rule_id = None
    SafetyEvent.objects.bulk_create(events)


_write_async = database_sync_to_async(_write, thread_sensitive=False)


class EventWriter:
    def __init__(self) -> None:
        self._pending: list[SafetyEvent] = []
        self._task: asyncio.Task | None = None

    def add(self, event: SafetyEvent) -> None:
        metrics.SAFETY_EVENTS.labels(event.action).inc()
        self._pending.append(event)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while self._pending:
            await asyncio.sleep(settings.SAFETY_EVENT_FLUSH_SECONDS)
            await self.flush()

    async def flush(self) -> None:
        events, self._pending = self._pending, []
        if not events:
            return
        try:
            await _write_async(events)
        except Exception:
            # Losing audit lines must never break serving; say so loudly instead.
            logger.exception("could not write %d safety events", len(events))


event_writer = EventWriter()
