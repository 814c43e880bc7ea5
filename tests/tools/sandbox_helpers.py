"""Helpers for the sandbox tests: processes still alive, by a marker in their command line."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path

from apps.tools.sandbox.base import RunLimits

FAST = RunLimits(timeout_seconds=5, cpu_seconds=5, max_output_bytes=64 * 1024)


def limits(**changes) -> RunLimits:
    return dataclasses.replace(FAST, **changes)


def processes_with(marker: str) -> list[int]:
    """PIDs whose command line contains `marker` (zombies excluded: they hold nothing)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in cmdline and state != "Z" and int(entry.name) != os.getpid():
            found.append(int(entry.name))
    return found


def processes_of_uid(uid: int) -> int:
    """Live (not zombie) processes of `uid`."""
    count = 0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if entry.stat().st_uid == uid and state != "Z":
                    count += 1
            except OSError:
                continue
    return count


def gone_soon(count: Callable[[], int], *, within: float = 1.0) -> int:
    """What `count` gives once it reaches 0, or after `within` seconds: processes SIGKILLed
    with their PID namespace take a moment to be torn down by the kernel."""
    deadline = time.monotonic() + within
    while (left := count()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return left
