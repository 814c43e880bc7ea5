"""What stalls the event loop: a watchdog for the tail latency nobody can see in a profile.

A request that waits 300 ms while its engine answered in 200 shows up only at p99, and a
sampling profiler averages it away. With `LOOP_STALL_MS` set, a heartbeat callback runs on
the loop every few milliseconds and a watchdog thread checks it: when the loop has not
come back for `LOOP_STALL_MS`, the thread takes the loop thread's Python stack at that
moment (what is blocking it), and when the loop comes back it logs one line with the
stall's length, the stack, and the garbage collections that ran during it (their pauses
are a stall of their own, and the stack alone would only show where one happened to
start). `bench/run.py --stalls MS` turns it on and sums the lines up.

Off by default: the heartbeat and the thread cost little, but the collection callback
runs on every collection (thousands a second under load).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field

logger = logging.getLogger("gateway.loop_stall")

HEARTBEAT_SECONDS = 0.002


@dataclass
class _Stall:
    began: float  # the last heartbeat before it
    stack: str = ""


@dataclass
class LoopWatch:
    threshold: float  # seconds
    loop: asyncio.AbstractEventLoop
    loop_thread: int
    last_beat: float = field(default_factory=time.perf_counter)
    stall: _Stall | None = None
    collections: list[tuple[int, float, float]] = field(default_factory=list)
    _gc_started: float = 0.0
    _stopped: threading.Event = field(default_factory=threading.Event)

    def beat(self) -> None:
        now = time.perf_counter()
        stall, self.stall = self.stall, None
        if stall is not None:
            self._report(stall, ended=now)
        elif now - self.last_beat >= self.threshold:  # too short for the thread to catch
            self._report(_Stall(began=self.last_beat, stack="(not caught)"), ended=now)
        self.last_beat = now
        self.collections.clear()
        if not self._stopped.is_set():
            self.loop.call_later(HEARTBEAT_SECONDS, self.beat)

    def watch(self) -> None:
        """The watchdog thread: catch the loop thread's stack while it is stalled."""
        while not self._stopped.wait(self.threshold / 4):
            if self.stall is None and time.perf_counter() - self.last_beat >= self.threshold:
                frame = sys._current_frames().get(self.loop_thread)
                stack = "".join(traceback.format_stack(frame, limit=40)) if frame else ""
                self.stall = _Stall(began=self.last_beat, stack=stack)

    def on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        elif threading.get_ident() == self.loop_thread:
            now = time.perf_counter()
            self.collections.append((info["generation"], self._gc_started, now))

    def _report(self, stall: _Stall, *, ended: float) -> None:
        length = ended - stall.began - HEARTBEAT_SECONDS
        if length < self.threshold:
            return
        paused = [(g, b - stall.began, e - b) for g, b, e in self.collections if e >= stall.began]
        gc_note = ", ".join(f"gen{g} {d * 1000:.1f} ms" for g, _, d in paused) or "none"
        logger.warning(
            "event loop stalled %.1f ms (collections: %s); loop thread was at:\n%s",
            length * 1000,
            gc_note,
            stall.stack.rstrip(),
        )

    def stop(self) -> None:
        self._stopped.set()
        if self.on_gc in gc.callbacks:
            gc.callbacks.remove(self.on_gc)


_watch: LoopWatch | None = None


def start(*, threshold_ms: float) -> LoopWatch | None:
    """Watch the running loop (once per process); None when the threshold is 0."""
    global _watch
    if threshold_ms <= 0:
        return None
    if _watch is not None:
        _watch.stop()
    loop = asyncio.get_running_loop()
    _watch = LoopWatch(threshold=threshold_ms / 1000, loop=loop, loop_thread=threading.get_ident())
    gc.callbacks.append(_watch.on_gc)
    loop.call_soon(_watch.beat)
    threading.Thread(target=_watch.watch, name="loop-watch", daemon=True).start()
    logger.info("watching the event loop for stalls over %.0f ms", threshold_ms)
    return _watch


def stop() -> None:
    global _watch
    if _watch is not None:
        _watch.stop()
        _watch = None
