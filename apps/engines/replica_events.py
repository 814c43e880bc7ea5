"""How a replica's driver and the requests waiting on it wake each other: a broadcast
Signal, the pending Swap, and cancelling a task without swallowing our own cancellation."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field


class OwnershipLost(Exception):
    """This process stopped owning the replica while a request waited on it."""


async def finish(task: asyncio.Task) -> None:
    """Cancel `task` and wait until it is done. Unlike `suppress(CancelledError)` around
    `await task`, this never swallows a cancellation of the caller itself."""
    task.cancel()
    await asyncio.wait({task})


class Signal:
    """Wake every current waiter; later waiters wait for the next fire()."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, seconds: float | None = None) -> None:
        if seconds is None:
            await self._event.wait()
            return
        # asyncio.wait, not wait_for: Python 3.11's wait_for can swallow a cancellation
        # that arrives as the event fires.
        waiter = asyncio.ensure_future(self._event.wait())
        try:
            await asyncio.wait({waiter}, timeout=seconds)
        finally:
            waiter.cancel()


@dataclass(eq=False)
class Swap:
    """A pending change of what the replica runs (`target` None: stop)."""

    target: int | None
    reason: str
    since: float = field(default_factory=time.monotonic)
    done: bool = False
