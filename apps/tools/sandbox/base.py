"""The sandbox interface: what a run may use (RunLimits), what it gave (RunResult), and the
Sandbox protocol every backend (bwrap.py, docker_backend.py) implements.

A run executes one program (`argv`, e.g. `["python3", "-I", "-c", code]`) in a fresh
throwaway work directory, and nothing it started outlives it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

# The limit names a RunResult reports in `limits_hit`.
TIMEOUT = "timeout"
CPU = "cpu"
MEMORY = "memory"
FILE_SIZE = "file_size"
OUTPUT = "output"
PROCESSES = "processes"


class SandboxUnavailable(Exception):
    """The configured backend cannot run here (bwrap missing, Docker unreachable, ...)."""


@dataclass(frozen=True, slots=True)
class RunLimits:
    timeout_seconds: float = 10.0  # wall clock, the whole run
    cpu_seconds: int = 10
    memory_bytes: int = 512 * 1024 * 1024  # address space per process
    max_processes: int = 64
    max_open_files: int = 64
    max_file_bytes: int = 16 * 1024 * 1024  # any one file written
    max_output_bytes: int = 64 * 1024  # stdout and stderr together; the run stops beyond
    max_listed_files: int = 100


@dataclass(frozen=True, slots=True)
class FileInfo:
    name: str  # relative to the work directory
    size: int


@dataclass(slots=True)
class RunResult:
    stdout: str = ""
    stderr: str = ""
    exit_code: int | None = None  # None: it never exited by itself (killed by the sandbox)
    duration_ms: float = 0.0
    timed_out: bool = False
    output_truncated: bool = False
    limits_hit: list[str] = field(default_factory=list)
    files: list[FileInfo] = field(default_factory=list)

    def hit(self, limit: str) -> None:
        if limit not in self.limits_hit:
            self.limits_hit.append(limit)


class Sandbox(Protocol):
    name: str

    def check_available(self) -> None:
        """Raise SandboxUnavailable, with a line an operator can act on, if it cannot run."""

    async def run(self, argv: list[str], *, limits: RunLimits) -> RunResult:
        """Run `argv` to completion, a limit, or cancellation (which kills it at once)."""
