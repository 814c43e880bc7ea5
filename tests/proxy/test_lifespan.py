"""The ASGI lifespan of a gateway process (apps/proxy/lifespan.py)."""

from __future__ import annotations

import gc
from typing import Any

import pytest
from django.test import override_settings

from apps.proxy.lifespan import LifespanApp

pytestmark = pytest.mark.django_db(transaction=True)


@override_settings(ENGINE_MANAGER_AUTOSTART=False)
async def test_it_takes_startup_objects_out_of_the_garbage_collectors_walks() -> None:
    incoming = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[str] = []
    frozen_at_startup: list[int] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message["type"])
        if message["type"] == "lifespan.startup.complete":
            frozen_at_startup.append(gc.get_freeze_count())

    gc.unfreeze()
    try:
        await LifespanApp()({"type": "lifespan"}, receive, send)
    finally:
        gc.unfreeze()

    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    # Everything loaded at startup, not a handful of objects.
    assert frozen_at_startup[0] > 10_000
