"""The event-loop stall watchdog (apps/observability/loop_watch.py): what an operator or
bench/run.py --stalls reads in the log when something blocks the loop."""

from __future__ import annotations

import asyncio
import gc
import logging
import time

import pytest

from apps.observability import loop_watch


def block_the_loop_in_json_parsing(seconds: float) -> None:
    time.sleep(seconds)  # a synchronous call on the loop, as a slow parser would be


async def run_watched(threshold_ms: float, work) -> None:
    loop_watch.start(threshold_ms=threshold_ms)
    try:
        await asyncio.sleep(0.05)  # a few quiet heartbeats
        work()
        await asyncio.sleep(0.05)  # the loop is back: the stall is reported
    finally:
        loop_watch.stop()


def stall_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "gateway.loop_stall"]


def test_it_logs_a_stall_with_what_blocked_the_loop(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.loop_stall")

    asyncio.run(run_watched(30, lambda: block_the_loop_in_json_parsing(0.2)))

    # The one stall caught inside the blocking call (a loaded host may add others, and
    # their stacks may quote this test's line that names it, hence the frame's own name).
    [line] = [x for x in stall_lines(caplog) if ", in block_the_loop_in_json_parsing\n" in x]
    stalled_ms = float(line.split("stalled ")[1].split(" ms")[0])
    assert 190 <= stalled_ms < 400


def test_it_names_the_garbage_collections_during_a_stall(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.loop_stall")

    def collect_while_blocked() -> None:
        gc.collect()
        block_the_loop_in_json_parsing(0.1)

    asyncio.run(run_watched(30, collect_while_blocked))

    assert any("collections: gen2" in line for line in stall_lines(caplog))


def test_it_logs_nothing_when_the_loop_keeps_up(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.loop_stall")

    asyncio.run(run_watched(100, lambda: block_the_loop_in_json_parsing(0.01)))

    assert stall_lines(caplog) == []


def test_it_stays_off_without_a_threshold() -> None:
    async def started() -> object:
        return loop_watch.start(threshold_ms=0)

    assert asyncio.run(started()) is None
