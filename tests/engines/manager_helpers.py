"""Shared setup for the engine manager tests: managed engines that run the fake engine
(tests/fake_engine.py) as real processes, a manager per test, and small HTTP helpers."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from channels.db import database_sync_to_async

from apps.engines.manager import EngineManager
from apps.engines.models import Engine, EngineInstance, EngineVariant
from apps.engines.services import engine_register_managed

ROOT = Path(__file__).resolve().parent.parent.parent
FAKE_ENGINE = ROOT / "tests" / "fake_engine.py"
FAKE_TEMPLATE = (
    f"{{python}} {FAKE_ENGINE} --port {{port}} --ctx-size {{ctx_size}} --model fake-model "
    "--slots {slots} {extra_args}"
)


@pytest.fixture
def engine_settings(settings, tmp_path: Path):
    """Fast polling and short grace so tests run in seconds; logs and models in tmp."""
    settings.MODELS_DIR = tmp_path / "models"
    settings.MODELS_DIR.mkdir()
    settings.ENGINE_LOG_DIR = tmp_path / "engine-logs"
    settings.ENGINE_OWNER_POLL_SECONDS = 0.1
    settings.ENGINE_SWAP_GRACE_SECONDS = 0.5
    settings.ENGINE_DRAIN_TIMEOUT_SECONDS = 20
    settings.ENGINE_RESTART_BACKOFF_SECONDS = 0.1
    return settings


@pytest.fixture
async def manager(engine_settings) -> AsyncIterator[EngineManager]:
    manager = EngineManager()
    await manager.start()
    yield manager
    await manager.shutdown()


def managed_engine(
    name: str = "local",
    *,
    template: str = FAKE_TEMPLATE,
    ctx_sizes: tuple[int, ...] = (1024, 2048),
    model: str = "fake-model",
    **options,
) -> tuple[Engine, list[EngineVariant]]:
    """A managed engine with one variant of `model` per context size."""
    for ctx_size in ctx_sizes:
        engine = engine_register_managed(
            name=name, command_template=template, models=[model], ctx_size=ctx_size,
            **options,
        )  # fmt: skip
    variants = sorted(engine.variants.all(), key=lambda v: v.ctx_size or 0)
    return engine, variants


create_managed = database_sync_to_async(managed_engine)


@database_sync_to_async
def instance(engine: Engine, replica: int = 0) -> EngineInstance | None:
    return EngineInstance.objects.filter(engine=engine, replica=replica).first()


async def get_json(base_url: str, path: str, **kwargs) -> tuple[int, object]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(base_url + path, timeout=aiohttp.ClientTimeout(total=10), **kwargs) as resp,
    ):
        return resp.status, await resp.json(content_type=None)


async def n_ctx(base_url: str) -> int:
    _, props = await get_json(base_url, "/props")
    return props["default_generation_settings"]["n_ctx"]


async def chat(base_url: str, *, delay: float = 0.0) -> int:
    """A chat completion the fake engine answers after `delay` seconds; its status."""
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
    headers = {"X-Fake-Delay": str(delay)}
    async with (
        aiohttp.ClientSession() as http,
        http.post(base_url + "/v1/chat/completions", json=body, headers=headers) as resp,
    ):
        await resp.read()
        return resp.status


async def eventually(check: Callable[[], object], *, within: float = 10.0):
    """Await until `check()` (sync or async) is truthy, for at most `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within} s")
        await asyncio.sleep(0.05)


# --- other gateway processes (tests/engines/manager_worker.py) ---------------------------


class Worker:
    """A separate process with its own EngineManager, on the test database; its JSON
    lines are read by a thread, so waiting for one never blocks on a half-read buffer.
    Its stderr (its log) goes to a file, printed when it finishes: pytest shows it when
    the test fails, which is the only way to know what the other process saw."""

    def __init__(
        self, *, engine_id: int, variant_id: int, log_dir: Path, stop: Path, go: Path | None
    ) -> None:
        from django.db import connection

        from tests.conftest import database_url

        args = ["--engine", str(engine_id), "--variant", str(variant_id)]
        args += ["--log-dir", str(log_dir), "--stop", str(stop)]
        args += ["--go", str(go)] if go else []
        env = {
            **os.environ,
            "DATABASE_URL": database_url(connection.settings_dict),
            "LOG_LEVEL": "INFO",
        }
        self.stderr_path = log_dir / f"worker-{time.monotonic_ns()}.stderr"
        with self.stderr_path.open("w") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tests.engines.manager_worker", *args],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        self.stop_file = stop
        self.messages: queue.Queue[dict | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.messages.put(json.loads(line))
        self.messages.put(None)

    def message(self, *, timeout: float = 30.0) -> dict:
        try:
            message = self.messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"worker {self.pid} said nothing within {timeout} s") from None
        if message is None:
            raise AssertionError(f"worker {self.pid} exited with code {self.process.wait()}")
        return message

    def finish(self) -> None:
        self.stop_file.touch()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        print(f"--- worker {self.pid} (exit code {self.process.returncode}), its stderr:")
        print(self.stderr_path.read_text())
