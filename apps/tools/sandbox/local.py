"""Running a sandboxed command as a local process group: rlimits set in the child before
it execs, output captured up to a cap, the whole group killed on timeout, overflow or
cancellation, the throwaway work directory listed and removed.

The bubblewrap backend (bwrap.py) wraps the command in namespaces; the rlimits-only mode
runs it bare (weaker, only when an operator allows it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from apps.tools.sandbox.base import (
    CPU,
    FILE_SIZE,
    MEMORY,
    OUTPUT,
    PROCESSES,
    TIMEOUT,
    FileInfo,
    RunLimits,
    RunResult,
)

NOBODY = 65534  # the unprivileged user a root gateway drops to (setpriv)
# The environment of the wrapper processes (setpriv, bwrap): built from nothing, so even
# their /proc/<pid>/environ holds none of the gateway's variables.
WRAPPER_ENV = {"PATH": "/usr/bin:/bin"}
_SIGNAL_LIMITS = {signal.SIGXCPU: CPU, signal.SIGXFSZ: FILE_SIZE}
_MEMORY_ERRORS = ("MemoryError", "Cannot allocate memory", "std::bad_alloc")


def rlimit_setter(limits: RunLimits) -> Callable[[], None]:
    """The preexec function: the limits, inherited by everything the command starts."""

    def apply() -> None:
        cpu = max(1, int(limits.cpu_seconds))
        # hard = soft + 1: the kernel sends SIGXCPU at the soft limit (reported as `cpu`)
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
        resource.setrlimit(resource.RLIMIT_NPROC, (limits.max_processes, limits.max_processes))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits.max_open_files, limits.max_open_files))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.max_file_bytes, limits.max_file_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def make_work_dir(root: str | None) -> Path:
    """A fresh private directory, owned by the user the command runs as."""
    path = Path(tempfile.mkdtemp(prefix="tool-run-", dir=root or None))
    if os.geteuid() == 0:
        os.chown(path, NOBODY, NOBODY)
    return path


def drop_privileges_prefix() -> list[str]:
    """A root gateway runs the command as nobody, with no capabilities and no way back."""
    if os.geteuid() != 0:
        return []
    return [
        "setpriv",
        f"--reuid={NOBODY}",
        f"--regid={NOBODY}",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--no-new-privs",
        "--",
    ]


class _Capture:
    """stdout and stderr up to `cap` bytes together; beyond it the run is stopped."""

    def __init__(self, cap: int, on_overflow: Callable[[], None]) -> None:
        self.cap = cap
        self.size = 0
        self.parts: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
        self.truncated = False
        self.on_overflow = on_overflow

    async def drain(self, stream: asyncio.StreamReader, name: str) -> None:
        while chunk := await stream.read(65536):
            room = self.cap - self.size
            if len(chunk) > room:
                chunk = chunk[: max(0, room)]
                if not self.truncated:
                    self.truncated = True
                    self.on_overflow()
            self.size += len(chunk)
            if chunk:
                self.parts[name].append(chunk)

    def text(self, name: str) -> str:
        return b"".join(self.parts[name]).decode("utf-8", errors="replace")


def kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


async def run_process_group(
    argv: list[str], *, limits: RunLimits, work_dir: Path, cwd: Path | None = None
) -> RunResult:
    """Run `argv` in its own session and process group under `limits`; whatever happens
    (limit, timeout, cancellation) the group is killed and reaped before this returns."""
    started = time.perf_counter()
    proc = await _spawn(argv, limits=limits, cwd=cwd or work_dir)
    capture = _Capture(limits.max_output_bytes, lambda: kill_group(proc.pid))
    result = RunResult()
    try:
        async with asyncio.timeout(limits.timeout_seconds):
            await asyncio.gather(
                capture.drain(proc.stdout, "stdout"),
                capture.drain(proc.stderr, "stderr"),
                proc.wait(),
            )
    except TimeoutError:
        result.timed_out = True
        result.hit(TIMEOUT)
    finally:
        kill_group(proc.pid)  # the command's leftovers too, even after a clean exit
        await asyncio.shield(proc.wait())
    result.duration_ms = (time.perf_counter() - started) * 1000
    _fill_result(result, capture, proc.returncode)
    return result


async def _spawn(argv: list[str], *, limits: RunLimits, cwd: Path) -> asyncio.subprocess.Process:
    """Start the process group; a cancellation while it starts still kills it (the child
    may exist before the spawn returns)."""
    spawn = asyncio.ensure_future(
        asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=WRAPPER_ENV,
            cwd=cwd,
            preexec_fn=rlimit_setter(limits),
            start_new_session=True,
        )
    )
    try:
        return await asyncio.shield(spawn)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            proc = await spawn
            kill_group(proc.pid)
            await proc.wait()
        raise


def _fill_result(result: RunResult, capture: _Capture, returncode: int | None) -> None:
    result.stdout, result.stderr = capture.text("stdout"), capture.text("stderr")
    result.output_truncated = capture.truncated
    if capture.truncated:
        result.hit(OUTPUT)
    killed = result.timed_out or capture.truncated
    result.exit_code = None if killed else _exit_code(returncode)
    signo = _signal_of(returncode)
    if signo in _SIGNAL_LIMITS:
        result.hit(_SIGNAL_LIMITS[signo])
    if any(marker in result.stderr for marker in _MEMORY_ERRORS):
        result.hit(MEMORY)
    if "fork" in result.stderr and "Resource temporarily unavailable" in result.stderr:
        result.hit(PROCESSES)  # RLIMIT_NPROC: fork() failed with EAGAIN


def _signal_of(returncode: int | None) -> int | None:
    """The signal that ended the command: negative returncode, or bwrap's 128 + signal."""
    if returncode is None:
        return None
    if returncode < 0:
        return -returncode
    return returncode - 128 if returncode > 128 else None


def _exit_code(returncode: int | None) -> int | None:
    if returncode is None:
        return None
    return 128 - returncode if returncode < 0 else returncode


def list_files(work_dir: Path, *, limit: int) -> list[FileInfo]:
    """Regular files the command left in its directory (names and sizes), never following
    links it may have planted."""
    files: list[FileInfo] = []
    for root, _dirs, names in os.walk(work_dir, followlinks=False):
        for name in sorted(names):
            path = Path(root) / name
            with contextlib.suppress(OSError):
                info = path.lstat()
                if path.is_file() and not path.is_symlink():
                    files.append(FileInfo(name=str(path.relative_to(work_dir)), size=info.st_size))
            if len(files) >= limit:
                return files
    return files


def remove_work_dir(work_dir: Path) -> None:
    shutil.rmtree(work_dir, ignore_errors=True)
