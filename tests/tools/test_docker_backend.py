"""The docker backend against a fake Docker API (no Docker engine here): the container
settings it asks for, output, timeout, cleanup. README says how to run it against a real
Docker engine (TOOLS_DOCKER_TEST_URL)."""

from __future__ import annotations

import asyncio
import os

import pytest

from apps.tools.sandbox.base import OUTPUT, TIMEOUT, SandboxUnavailable
from apps.tools.sandbox.config import sandbox_from_settings, tool_argv
from apps.tools.sandbox.docker_backend import DockerSandbox
from tests.tools.fake_docker import fake_docker
from tests.tools.sandbox_helpers import limits

MB = 1024 * 1024


@pytest.fixture
def docker_api():
    with fake_docker() as fake:
        yield fake


def sandbox_for(fake) -> DockerSandbox:
    return DockerSandbox(image="python:3.11-slim", base_url=fake.url)


async def test_it_asks_for_a_locked_down_container(docker_api):
    docker_api.stdout = b"42\n"
    result = await sandbox_for(docker_api).run(
        tool_argv("python", "print(6 * 7)"),
        limits=limits(memory_bytes=256 * MB, max_processes=32, cpu_seconds=3),
    )
    assert (result.stdout, result.exit_code, result.timed_out) == ("42\n", 0, False)
    body = docker_api.create_body()
    host = body["HostConfig"]
    assert body["Image"] == "python:3.11-slim"
    assert body["Cmd"] == ["python3", "-I", "-c", "print(6 * 7)"]
    assert body["User"] == "65534:65534"
    assert body["WorkingDir"] == "/sandbox"
    assert set(body["Env"]) == {
        "PATH=/usr/local/bin:/usr/bin:/bin",
        "HOME=/sandbox",
        "TMPDIR=/tmp",
        "LANG=C.UTF-8",
        "PYTHONDONTWRITEBYTECODE=1",
    }
    assert host["NetworkMode"] == "none"
    assert (host["Memory"], host["MemorySwap"], host["PidsLimit"]) == (256 * MB, 256 * MB, 32)
    assert host["ReadonlyRootfs"] is True
    assert set(host["Tmpfs"]) == {"/sandbox", "/tmp"}
    assert host["CapDrop"] == ["ALL"]
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert {u["Name"]: u["Soft"] for u in host["Ulimits"]} == {
        "cpu": 3,
        "nofile": 64,
        "fsize": 16 * MB,
    }
    assert docker_api.removed.is_set()  # removed after the run


async def test_it_reports_stderr_and_the_exit_code(docker_api):
    docker_api.exit_code, docker_api.stderr = 3, b"oops\n"
    result = await sandbox_for(docker_api).run(tool_argv("bash", "exit 3"), limits=limits())
    assert (result.exit_code, result.stderr) == (3, "oops\n")


async def test_it_kills_and_removes_a_container_at_the_timeout(docker_api):
    docker_api.run_seconds = 30
    result = await sandbox_for(docker_api).run(
        tool_argv("python", "while True: pass"), limits=limits(timeout_seconds=1)
    )
    assert result.timed_out
    assert TIMEOUT in result.limits_hit
    assert docker_api.killed.is_set()
    assert docker_api.removed.is_set()


async def test_its_output_is_truncated(docker_api):
    docker_api.stdout = b"y\n" * 10_000
    result = await sandbox_for(docker_api).run(
        tool_argv("bash", "yes"), limits=limits(max_output_bytes=1000)
    )
    assert result.output_truncated
    assert OUTPUT in result.limits_hit
    assert len(result.stdout) == 1000


async def test_a_cancelled_run_still_removes_its_container(docker_api):
    docker_api.run_seconds = 30
    run = asyncio.ensure_future(
        sandbox_for(docker_api).run(tool_argv("python", "1"), limits=limits(timeout_seconds=20))
    )
    for _ in range(200):
        await asyncio.sleep(0.02)
        if any(path.endswith("/wait") for path in docker_api.paths("POST")):
            break
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert docker_api.removed.wait(timeout=5)


async def test_an_unreachable_docker_is_a_clear_refusal():
    sandbox = DockerSandbox(image="python:3.11-slim", base_url="tcp://127.0.0.1:9")
    with pytest.raises(SandboxUnavailable, match="Docker"):
        await sandbox.run(["python3", "-c", "1"], limits=limits())
    with pytest.raises(SandboxUnavailable, match="Docker is not reachable"):
        sandbox.check_available()


def test_the_settings_choose_it(settings, docker_api):
    settings.TOOLS_SANDBOX_BACKEND = "docker"
    settings.TOOLS_DOCKER_URL = docker_api.url
    settings.TOOLS_DOCKER_IMAGE = "my/tools:1"
    sandbox = sandbox_from_settings()
    assert isinstance(sandbox, DockerSandbox)
    assert sandbox.image == "my/tools:1"
    sandbox.check_available()  # pings the fake


@pytest.mark.skipif(
    not os.environ.get("TOOLS_DOCKER_TEST_URL"),
    reason="needs a real Docker engine: TOOLS_DOCKER_TEST_URL=unix:///var/run/docker.sock",
)
async def test_a_real_docker_engine_runs_python_without_network():
    sandbox = DockerSandbox(
        image=os.environ.get("TOOLS_DOCKER_TEST_IMAGE", "python:3.11-slim"),
        base_url=os.environ["TOOLS_DOCKER_TEST_URL"],
    )
    code = (
        "import socket\n"
        "try:\n    socket.create_connection(('1.1.1.1', 53), timeout=2); print('online')\n"
        "except OSError:\n    print('offline')\n"
        "try:\n    open('/etc/x', 'w')\nexcept OSError:\n    print('read-only')\n"
    )
    result = await sandbox.run(tool_argv("python", code), limits=limits(timeout_seconds=30))
    assert result.stdout.split() == ["offline", "read-only"], result
