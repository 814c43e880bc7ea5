"""The ASGI lifespan of a gateway process (apps/proxy/lifespan.py)."""

from __future__ import annotations

import gc
from typing import Any

import pytest
from django.test import override_settings

from apps.proxy.lifespan import LifespanApp

pytestmark = pytest.mark.django_db(transaction=True)


async def _run_lifespan() -> tuple[list[str], dict[str, Any]]:
    """Start and stop a LifespanApp; the messages it sent, and the collector's state when
    it reported startup complete. The collector is left as it was."""
    incoming = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[str] = []
    at_startup: dict[str, Any] = {}

    async def receive() -> dict[str, Any]:
        return incoming.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message["type"])
        if message["type"] == "lifespan.startup.complete":
            at_startup.update(frozen=gc.get_freeze_count(), thresholds=gc.get_threshold())

    thresholds = gc.get_threshold()
    gc.unfreeze()
    try:
        await LifespanApp()({"type": "lifespan"}, receive, send)
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()
    return sent, at_startup


@override_settings(ENGINE_MANAGER_AUTOSTART=False)
async def test_it_takes_startup_objects_out_of_the_garbage_collectors_walks() -> None:
    sent, at_startup = await _run_lifespan()
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    # Everything loaded at startup, not a handful of objects.
    assert at_startup["frozen"] > 10_000


@override_settings(ENGINE_MANAGER_AUTOSTART=False, GC_THRESHOLDS=(12345, 7, 3))
async def test_it_sets_the_collectors_thresholds_from_the_setting() -> None:
    _, at_startup = await _run_lifespan()
    assert at_startup["thresholds"] == (12345, 7, 3)


@pytest.mark.parametrize("raw", ["1,2", "1,2,x", "1,2,3,4", "1,-2,3"])
def test_it_refuses_a_malformed_gc_thresholds_setting(monkeypatch, raw: str) -> None:
    from config.settings import ImproperEnv, _gc_thresholds

    monkeypatch.setenv("GC_THRESHOLDS", raw)
    with pytest.raises(ImproperEnv, match="GC_THRESHOLDS must be three integers >= 0"):
        _gc_thresholds()


def test_it_reads_gc_thresholds_from_the_environment(monkeypatch) -> None:
    from config.settings import _gc_thresholds

    monkeypatch.setenv("GC_THRESHOLDS", "700, 10, 10")
    assert _gc_thresholds() == (700, 10, 10)
