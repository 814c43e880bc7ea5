"""The `docker` backend: each run a fresh container of the operator's image, through the
`docker` SDK (blocking calls on worker threads, so the event loop never waits on them).

    network_mode none, memory (no swap) and PID limits, CPU/open-files/file-size ulimits,
    a read-only root with a tmpfs work dir (and /tmp), all capabilities dropped,
    no-new-privileges, user nobody, an environment built from nothing, the same wall-clock
    timeout (then killed), removed after the run (and when the run is cancelled).

Files the program writes live in the container's tmpfs and go with it, so the result
lists none (the subprocess backend lists them).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import PurePosixPath
from typing import Any

import docker
import requests
from docker.errors import DockerException
from docker.types import LogConfig, Ulimit

from apps.tools.sandbox.base import (
    OUTPUT,
    PROCESSES,
    TIMEOUT,
    RunLimits,
    RunResult,
    SandboxUnavailable,
)
from apps.tools.sandbox.bwrap import SANDBOX_ENV, SANDBOX_HOME, TMP_BYTES

API_VERSION = "1.43"  # pinned: no version probe per run
NOBODY = "65534:65534"


class DockerSandbox:
    name = "docker"

    def __init__(self, *, image: str, base_url: str | None = None) -> None:
        self.image = image
        self.base_url = base_url

    def client(self) -> docker.DockerClient:
        try:
            if self.base_url:
                return docker.DockerClient(base_url=self.base_url, version=API_VERSION)
            return docker.from_env(version=API_VERSION)
        except DockerException as exc:
            raise SandboxUnavailable(f"Docker is not reachable: {exc}") from None

    def check_available(self) -> None:
        client = self.client()
        try:
            client.ping()
        except (DockerException, requests.RequestException) as exc:
            raise SandboxUnavailable(f"Docker is not reachable: {exc}") from None
        finally:
            client.close()

    def container_args(self, argv: list[str], limits: RunLimits) -> dict[str, Any]:
        cpu = max(1, int(limits.cpu_seconds))
        return {
            "image": self.image,
            # The image's PATH finds the interpreter (python3, bash), wherever it lives.
            "command": [PurePosixPath(argv[0]).name, *argv[1:]],
            "network_mode": "none",
            "mem_limit": limits.memory_bytes,
            "memswap_limit": limits.memory_bytes,
            "pids_limit": limits.max_processes,
            "read_only": True,
            "tmpfs": {
                SANDBOX_HOME: f"rw,nosuid,nodev,size={limits.max_file_bytes},mode=1777",
                "/tmp": f"rw,nosuid,nodev,size={TMP_BYTES},mode=1777",
            },
            "working_dir": SANDBOX_HOME,
            "user": NOBODY,
            "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges"],
            "environment": dict(SANDBOX_ENV),
            "hostname": "sandbox",
            "ulimits": [
                Ulimit(name="cpu", soft=cpu, hard=cpu + 1),
                Ulimit(name="nofile", soft=limits.max_open_files, hard=limits.max_open_files),
                Ulimit(name="fsize", soft=limits.max_file_bytes, hard=limits.max_file_bytes),
            ],
            "log_config": LogConfig(
                type="json-file", config={"max-size": str(limits.max_output_bytes * 2)}
            ),
            "labels": {"llm-gateway.tool-run": "1"},
            "stdin_open": False,
            "tty": False,
        }

    async def run(self, argv: list[str], *, limits: RunLimits) -> RunResult:
        client = await asyncio.to_thread(self.client)
        container = None
        try:
            container = await asyncio.to_thread(
                client.containers.create, **self.container_args(argv, limits)
            )
            return await self._run(container, limits)
        except (DockerException, requests.RequestException) as exc:
            raise SandboxUnavailable(f"Docker failed to run the tool: {exc}") from None
        finally:
            if container is not None:
                # Shielded: a cancelled run (client gone) still removes its container.
                await asyncio.shield(asyncio.to_thread(_remove, container))
            client.close()

    async def _run(self, container: Any, limits: RunLimits) -> RunResult:
        started = time.perf_counter()
        result = RunResult()
        await asyncio.to_thread(container.start)
        try:
            status = await asyncio.to_thread(container.wait, timeout=limits.timeout_seconds)
            result.exit_code = int(status.get("StatusCode", -1))
        except (requests.exceptions.Timeout, requests.exceptions.ConnectionError):
            # The wait's read timed out (urllib3 may report it as a connection error).
            result.timed_out = True
            result.hit(TIMEOUT)
            await asyncio.to_thread(_kill, container)
        result.duration_ms = (time.perf_counter() - started) * 1000
        stdout = await asyncio.to_thread(container.logs, stdout=True, stderr=False)
        stderr = await asyncio.to_thread(container.logs, stdout=False, stderr=True)
        _fill_output(result, stdout, stderr, limits.max_output_bytes)
        if result.exit_code == 137 and not result.timed_out:
            result.hit(PROCESSES if "fork" in result.stderr else "memory")
        return result


def _fill_output(result: RunResult, stdout: bytes, stderr: bytes, cap: int) -> None:
    if len(stdout) + len(stderr) > cap:
        result.output_truncated = True
        result.hit(OUTPUT)
        stdout = stdout[:cap]
        stderr = stderr[: max(0, cap - len(stdout))]
    result.stdout = stdout.decode("utf-8", errors="replace")
    result.stderr = stderr.decode("utf-8", errors="replace")


def _kill(container: Any) -> None:
    with contextlib.suppress(DockerException):  # it may have ended meanwhile
        container.kill()


def _remove(container: Any) -> None:
    with contextlib.suppress(DockerException):  # already gone
        container.remove(force=True)
