"""One engine OS process: launch, log capture, health wait, stop.

The process runs in its own session (process group), so stopping it also stops whatever
it spawned: SIGTERM to the group, SIGKILL after the grace period. Its stdout and stderr
go to a ring buffer (the recent log shown in the admin and in start-up errors) and to a
log file that survives the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections import deque
from pathlib import Path

import aiohttp

LOG_ROTATE_BYTES = 10 * 1024 * 1024
ERROR_TAIL_LINES = 30
_READ_CHUNK = 65536
_HEALTH_POLL_START = 0.1
_HEALTH_POLL_MAX = 0.25
# llama.cpp and vLLM answer GET /health (503 while loading); others list their models.
HEALTH_PATHS = {"llamacpp": "/health", "vllm": "/health"}


class EngineStartError(Exception):
    """A managed engine could not be started (or is not available); the message says why
    and ends with the process's last log lines. The /v1 pipeline answers 503."""

    def __init__(self, message: str, *, exit_code: int | None = None, log_tail: str = "") -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.log_tail = log_tail


def free_port() -> int:
    """A port free right now (the engine binds it a moment later; a clash fails its start)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def health_path(flavor: str) -> str:
    return HEALTH_PATHS.get(flavor, "/v1/models")


class ProcessLog:
    """The last `lines` lines in memory, everything appended to `path`."""

    def __init__(self, path: Path, *, lines: int) -> None:
        self.path = path
        self.lines: deque[str] = deque(maxlen=lines)
        self._partial = b""
        self._file = None
        self.version = 0  # bumped on each new line, so publishers know when to re-send

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and self.path.stat().st_size > LOG_ROTATE_BYTES:
            self.path.replace(self.path.with_suffix(".log.1"))
        self.close()
        self._file = self.path.open("ab", buffering=0)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def note(self, text: str) -> None:
        """A line from the gateway itself (launch, exit), marked so it stands out."""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self._add_line(f"[gateway {stamp}] {text}")
        self._write(f"[gateway {stamp}] {text}\n".encode())

    def feed(self, data: bytes) -> None:
        self._write(data)
        data = self._partial + data
        *complete, self._partial = data.split(b"\n")
        for raw in complete:
            self._add_line(raw.decode("utf-8", "replace").rstrip("\r"))

    def flush_partial(self) -> None:
        if self._partial:
            self._add_line(self._partial.decode("utf-8", "replace"))
            self._partial = b""

    def tail(self, count: int | None = None) -> str:
        lines = list(self.lines)
        return "\n".join(lines if count is None else lines[-count:])

    def _add_line(self, line: str) -> None:
        self.lines.append(line)
        self.version += 1

    def _write(self, data: bytes) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):  # a full disk must not kill the engine
                self._file.write(data)


class EngineProcess:
    """A launched engine. `label` names it in messages (engine#replica variant)."""

    def __init__(
        self, *, proc: asyncio.subprocess.Process, argv: list[str], port: int, log: ProcessLog
    ) -> None:
        self.proc = proc
        self.argv = argv
        self.port = port
        self.log = log
        self.base_url = f"http://127.0.0.1:{port}"
        self.started_at = time.time()
        self.stopping = False  # set before a deliberate stop, so the exit is not a crash
        self._pump = asyncio.ensure_future(self._read_output())

    @classmethod
    async def launch(
        cls, *, argv: list[str], port: int, log: ProcessLog, cwd: Path, label: str
    ) -> EngineProcess:
        log.open()
        log.note(f"starting {label}: {' '.join(argv)}")
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                cwd=cwd,
                start_new_session=True,  # own process group: stop() signals all of it
            )
        except OSError as exc:
            log.note(f"cannot execute: {exc}")
            raise EngineStartError(
                f"Engine {label} cannot be started: {exc}.", log_tail=log.tail()
            ) from None
        log.note(f"pid {proc.pid}, port {port}")
        return cls(proc=proc, argv=argv, port=port, log=log)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    async def _read_output(self) -> None:
        stream = self.proc.stdout
        assert stream is not None
        while data := await stream.read(_READ_CHUNK):
            self.log.feed(data)
        self.log.flush_partial()

    async def wait(self) -> int:
        code = await self.proc.wait()
        # The pipe may stay open in a grandchild; the log is complete enough after a moment.
        await asyncio.wait({self._pump}, timeout=1.0)
        return code

    async def wait_healthy(self, *, within: float, flavor: str, label: str) -> None:
        """Poll the health endpoint until 200; EngineStartError if the process exits first
        or stays unhealthy past `within` seconds."""
        url = self.base_url + health_path(flavor)
        deadline = time.monotonic() + within
        interval = _HEALTH_POLL_START
        exited = asyncio.ensure_future(self.wait())
        try:
            async with aiohttp.ClientSession() as http:
                while True:
                    if exited.done():
                        raise self._exited_error(label, exited.result())
                    remaining = deadline - time.monotonic()
                    if await _probe(http, url, min(2.0, max(remaining, 0.1))):
                        return
                    if time.monotonic() >= deadline:
                        raise self._unhealthy_error(label, url, within)
                    await asyncio.wait({exited}, timeout=interval)
                    interval = min(interval * 1.5, _HEALTH_POLL_MAX)
        finally:
            exited.cancel()

    def _exited_error(self, label: str, code: int) -> EngineStartError:
        self.log.note(f"exited with code {code} before it was healthy")
        tail = self.log.tail(ERROR_TAIL_LINES)
        return EngineStartError(
            f"Engine {label} exited with code {code} during start-up. Last log lines:\n{tail}",
            exit_code=code,
            log_tail=tail,
        )

    def _unhealthy_error(self, label: str, url: str, timeout: float) -> EngineStartError:
        self.log.note(f"not healthy at {url} after {timeout:g} s")
        tail = self.log.tail(ERROR_TAIL_LINES)
        return EngineStartError(
            f"Engine {label} did not become healthy at {url} within {timeout:g} s. "
            f"Last log lines:\n{tail}",
            log_tail=tail,
        )

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    async def stop(self, *, grace: float) -> int:
        """SIGTERM to the process group, SIGKILL after `grace` seconds; the exit code."""
        self.stopping = True
        if self.proc.returncode is None:
            self._signal_group(signal.SIGTERM)
            exited = asyncio.ensure_future(self.proc.wait())
            _, pending = await asyncio.wait({exited}, timeout=grace)
            if pending:
                exited.cancel()
                self.log.note(f"still running {grace:g} s after SIGTERM: SIGKILL")
                self._signal_group(signal.SIGKILL)
        code = await self.wait()
        self.log.note(f"stopped (exit code {code})")
        return code


async def _probe(http: aiohttp.ClientSession, url: str, seconds: float) -> bool:
    try:
        async with http.get(url, timeout=aiohttp.ClientTimeout(total=seconds)) as resp:
            await resp.read()
            return resp.status == 200
    except (TimeoutError, aiohttp.ClientError, OSError):
        return False
