"""Every safety event also counts in /metrics (gateway_safety_events_total{action})."""

from __future__ import annotations

from apps.observability import metrics
from apps.safety.events import EventWriter
from apps.safety.models import SafetyEvent


def count(action: str) -> float:
    return metrics.SAFETY_EVENTS.labels(action)._value.get()


async def test_it_counts_each_event_by_action():
    writer = EventWriter()
    before_block, before_flag = count("block"), count("flag")

    writer.add(SafetyEvent(action="block", stage="prompt"))
    writer.add(SafetyEvent(action="block", stage="response"))
    writer.add(SafetyEvent(action="flag", stage="prompt"))
    writer._pending.clear()  # nothing to write: this test has no database
    assert writer._task is not None
    writer._task.cancel()

    assert count("block") - before_block == 2
    assert count("flag") - before_flag == 1
