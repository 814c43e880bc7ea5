"""The sandbox's protections, directly against the bubblewrap backend.

Each test names what it proves; each fails if that protection is removed (checked once by
removing it: see README "Sandboxed tools")."""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid

import pytest
from django.conf import settings

from apps.tools.sandbox.base import CPU, MEMORY, OUTPUT, PROCESSES, TIMEOUT
from apps.tools.sandbox.bwrap import BwrapSandbox
from apps.tools.sandbox.config import tool_argv
from apps.tools.sandbox.local import NOBODY
from tests.tools.sandbox_helpers import gone_soon, limits, processes_of_uid, processes_with


@pytest.fixture
def sandbox() -> BwrapSandbox:
    return BwrapSandbox()


def escaped(*paths) -> bool:
    return any(os.path.exists(path) for path in paths)


def python(code: str) -> list[str]:
    return tool_argv("python", code)


def bash(command: str) -> list[str]:
    return tool_argv("bash", command)


async def test_it_runs_python_and_lists_the_files_it_wrote(sandbox):
    result = await sandbox.run(
        python("print(6 * 7)\nopen('out.csv', 'w').write('a,b\\n')"), limits=limits()
    )
    assert (result.stdout, result.exit_code, result.limits_hit) == ("42\n", 0, [])
    assert [(f.name, f.size) for f in result.files] == [("out.csv", 4)]


async def test_it_reports_the_exit_code_and_stderr(sandbox):
    result = await sandbox.run(bash("echo oops >&2; exit 3"), limits=limits())
    assert (result.exit_code, result.stderr) == (3, "oops\n")


async def test_it_cannot_reach_a_listener_on_loopback(sandbox):
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    code = (
        "import socket\n"
        f"try:\n    socket.create_connection(('127.0.0.1', {port}), timeout=2); print('connected')\n"
        "except OSError as exc:\n    print('refused', exc)\n"
    )
    try:
        result = await sandbox.run(python(code), limits=limits())
        with pytest.raises(TimeoutError):
            listener.accept()  # nobody got through
    finally:
        listener.close()
    assert result.stdout.startswith("refused"), result


async def test_a_fork_bomb_is_contained_and_the_loop_stays_responsive(sandbox):
    run = asyncio.ensure_future(
        sandbox.run(
            bash(":(){ :|:& };:; sleep 10"), limits=limits(timeout_seconds=3, max_processes=32)
        )
    )
    most, worst_tick = 0, 0.0
    while not run.done():
        tick = time.perf_counter()
        await asyncio.sleep(0.05)
        worst_tick = max(worst_tick, time.perf_counter() - tick)
        most = max(most, processes_of_uid(NOBODY))
    result = run.result()
    assert PROCESSES in result.limits_hit, result
    assert most <= 32 + 2, f"{most} sandboxed processes at once"  # + bwrap's own two
    assert worst_tick < 1.0, f"the event loop stalled {worst_tick:.2f} s"
    assert gone_soon(lambda: processes_of_uid(NOBODY)) == 0


async def test_allocating_4_gb_fails(sandbox):
    code = "b = bytearray(4 * 1024**3)\nprint('allocated', len(b))"
    result = await sandbox.run(python(code), limits=limits())
    assert "allocated" not in result.stdout
    assert "MemoryError" in result.stderr
    assert MEMORY in result.limits_hit


async def test_it_cannot_write_outside_its_work_dir(sandbox, tmp_path):
    open_dir = tmp_path / "world-writable"
    open_dir.mkdir(mode=0o777)
    open_dir.chmod(0o777)
    targets = [open_dir / "escaped", "/usr/escaped", "/escaped", "/tmp/../escaped"]
    code = "".join(
        f"try:\n    open({str(t)!r}, 'w').write('x'); print('wrote', {str(t)!r})\n"
        "except OSError as exc:\n    print('refused', exc)\n"
        for t in targets
    )
    result = await sandbox.run(python(code), limits=limits())
    assert "wrote" not in result.stdout, result.stdout
    assert not escaped(open_dir / "escaped", "/usr/escaped")


async def test_it_cannot_read_the_secret_key_data_dir_or_init_environ(sandbox, monkeypatch):
    marker = f"gateway-secret-{uuid.uuid4()}"
    monkeypatch.setenv("SECRET_KEY", marker)
    secret_file = settings.DATA_DIR / "secret_key"
    paths = [secret_file, settings.DATA_DIR, "/proc/1/environ", f"/proc/{os.getpid()}/environ"]
    code = "import os\n" + "".join(
        f"try:\n    p = {str(p)!r}\n    print(p, os.listdir(p) if os.path.isdir(p) else open(p).read())\n"
        "except OSError as exc:\n    print('refused', exc)\n"
        for p in paths
    )
    result = await sandbox.run(python(code), limits=limits())
    assert marker not in result.stdout
    assert result.stdout.count("refused") >= 3, result.stdout  # /proc/1 is the sandbox's init
    assert settings.SECRET_KEY not in result.stdout


async def test_its_environment_holds_none_of_the_gateways_variables(sandbox, monkeypatch):
    marker = f"sk-{uuid.uuid4()}"
    for name in ("DATABASE_URL", "SECRET_KEY", "OPENAI_API_KEY", "GATEWAY_ADMIN_KEY"):
        monkeypatch.setenv(name, marker)
    result = await sandbox.run(bash("env; cat /proc/*/environ 2>/dev/null"), limits=limits())
    assert marker not in result.stdout
    for name in ("DATABASE_URL", "SECRET_KEY", "OPENAI_API_KEY", "DJANGO_SETTINGS_MODULE"):
        assert name not in result.stdout
    assert "HOME=/sandbox" in result.stdout


async def test_an_infinite_loop_stops_at_the_timeout(sandbox):
    started = time.perf_counter()
    result = await sandbox.run(python("while True: pass"), limits=limits(timeout_seconds=1))
    assert result.timed_out
    assert TIMEOUT in result.limits_hit
    assert result.exit_code is None
    assert time.perf_counter() - started < 4


async def test_cpu_seconds_are_limited(sandbox):
    result = await sandbox.run(
        python("while True: pass"), limits=limits(timeout_seconds=10, cpu_seconds=1)
    )
    assert CPU in result.limits_hit
    assert not result.timed_out


async def test_an_output_flood_is_truncated_and_stopped(sandbox):
    started = time.perf_counter()
    result = await sandbox.run(bash("yes flood"), limits=limits(max_output_bytes=10_000))
    assert result.output_truncated
    assert OUTPUT in result.limits_hit
    assert len(result.stdout.encode()) + len(result.stderr.encode()) <= 10_000
    assert time.perf_counter() - started < 4  # stopped, not left to the timeout


async def test_a_forked_sleeping_child_is_killed_at_the_timeout(sandbox):
    marker = f"{time.time_ns() % 10**9}.123"
    code = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()  # leaves the process group: the PID namespace still holds it\n"
        f"    os.execv('/usr/bin/sleep', ['sleep', '{marker}'])\n"
        "time.sleep(1000)\n"
    )
    result = await sandbox.run(python(code), limits=limits(timeout_seconds=1))
    assert result.timed_out
    assert processes_with(marker) == []


async def test_a_background_child_does_not_outlive_a_clean_exit(sandbox):
    marker = f"{time.time_ns() % 10**9}.456"
    result = await sandbox.run(bash(f"nohup sleep {marker} >/dev/null 2>&1 &"), limits=limits())
    assert result.exit_code == 0
    assert processes_with(marker) == []


async def test_cancelling_a_run_kills_it_at_once(sandbox):
    marker = f"{time.time_ns() % 10**9}.789"
    run = asyncio.ensure_future(sandbox.run(bash(f"sleep {marker}"), limits=limits()))
    for _ in range(500):  # a loaded machine may take seconds to start it
        await asyncio.sleep(0.02)
        if processes_with(marker):
            break
    assert processes_with(marker), "the command never started"
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert processes_with(marker) == []
