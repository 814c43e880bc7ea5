"""Engine processes a dead owner left behind: stopped before a new owner launches its own,
but only if the pid is still the process that owner started."""

from __future__ import annotations

import os
import signal
import time
from datetime import datetime

import psutil


def kill_orphan(pid: int, argv: list[str], started_at: datetime | None, grace: float) -> bool:
    """Stop a process a dead owner launched, if that pid is still that process (same
    command line, same start time): a recycled pid must never be killed."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE or proc.cmdline() != argv:
            return False
        if started_at is not None and abs(proc.create_time() - started_at.timestamp()) > 5:
            return False
        group = os.getpgid(pid) == pid  # launched as a session leader: stop its group
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            os.killpg(pid, sig) if group else proc.send_signal(sig)
            if _gone(proc, timeout=wait):
                break
    except (psutil.Error, ProcessLookupError, PermissionError):
        return False
    return True


def _gone(proc: psutil.Process, *, timeout: float) -> bool:
    """Exited (a zombie counts: its reaper is init, not us)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False
