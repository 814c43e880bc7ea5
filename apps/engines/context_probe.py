"""Does llama-server start with this context size? Launch it, wait for /health, check the
context it reports (/props), stop it. Used by `scan_models --test-context`.

llama.cpp allocates (and clears) the whole KV cache when it creates the context, so a
context that does not fit fails at start-up (allocation error or the OOM killer), not at
the first long request: a healthy start is the confirmation.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from apps.engines.engine_process import free_port
from apps.engines.launch import llama_server_binary

FIRST_CONTEXT = 512
LOG_TAIL_CHARS = 600


@dataclass(frozen=True)
class ProbeResult:
    ctx: int
    ok: bool
    seconds: float
    detail: str


def context_ladder(*, trained: int, after: int | None) -> list[int]:
    """512, 1024, ... doubling, then the trained length itself; only sizes above `after`
    (the largest already confirmed), so an interrupted run resumes where it stopped."""
    sizes = []
    size = FIRST_CONTEXT
    while size < trained:
        sizes.append(size)
        size *= 2
    sizes.append(trained)
    return [s for s in sizes if after is None or s > after]


def probe_context(*, model_file: Path, ctx: int, timeout: float) -> ProbeResult:
    port = free_port()
    command = [
        llama_server_binary(), "-m", str(model_file), "-c", str(ctx), "-np", "1",
        "--host", "127.0.0.1", "--port", str(port), "--no-webui",
    ]  # fmt: skip
    started = time.monotonic()
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            ok, detail = _wait_ready(process, f"http://127.0.0.1:{port}", ctx, timeout)
        finally:
            _stop(process)
        if not ok:
            log.seek(0)
            detail += "; log: " + log.read().decode(errors="replace")[-LOG_TAIL_CHARS:].strip()
    return ProbeResult(ctx=ctx, ok=ok, seconds=round(time.monotonic() - started, 2), detail=detail)


def _wait_ready(process: subprocess.Popen, url: str, ctx: int, timeout: float) -> tuple[bool, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False, f"llama-server exited with code {process.returncode}"
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return _reported_context(url, ctx)
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return False, f"not healthy within {timeout:g} s"


def _reported_context(url: str, ctx: int) -> tuple[bool, str]:
    """llama-server may quietly use another size than asked; only the asked one counts."""
    props = httpx.get(f"{url}/props", timeout=5).json()
    n_ctx = props.get("default_generation_settings", {}).get("n_ctx")
    if n_ctx is not None and int(n_ctx) != ctx:
        return False, f"started with n_ctx={n_ctx} instead of {ctx}"
    return True, "started"


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
