"""Run ingestion workers (procrastinate) in this process."""

from __future__ import annotations

import asyncio
import ctypes
import signal
import subprocess
import sys
from pathlib import Path

from django.conf import settings
from procrastinate.contrib.django import app

from apps.core.usage import usage_drain
from apps.engines.client import close_engine_session
from apps.rag.tasks import QUEUE, stalled_jobs_retry

PR_SET_PDEATHSIG = 1


async def worker_run(*, concurrency: int, wait: bool = True, name: str | None = None) -> None:
    """Work the rag queue until stopped (or, without `wait`, until it is empty)."""
    with app.replace_connector(app.connector.get_worker_connector()):
        async with app.open_async():
            await stalled_jobs_retry()  # jobs of a worker that crashed before this start
            try:
                await app.run_worker_async(
                    queues=[QUEUE],
                    concurrency=concurrency,
                    wait=wait,
                    name=name,
                    install_signal_handlers=wait,
                    fetch_job_polling_interval=1.0,
                )
            finally:
                await usage_drain()  # the embeddings' charges and request-log rows
                await close_engine_session()


def worker_main(*, concurrency: int | None = None, wait: bool = True) -> None:
    asyncio.run(worker_run(concurrency=concurrency or settings.RAG_WORKER_CONCURRENCY, wait=wait))


def worker_processes_start(*, count: int) -> list[subprocess.Popen]:
    """`manage.py rag_worker` processes next to the server (they inherit its environment:
    the database, and the scheduler socket shared with the server's workers)."""
    manage = Path(settings.BASE_DIR) / "manage.py"
    return [
        subprocess.Popen([sys.executable, str(manage), "rag_worker"], preexec_fn=_die_with_parent)
        for _ in range(count)
    ]


def _die_with_parent() -> None:
    """SIGTERM the worker when `serve` dies: uvicorn re-raises the signal it stopped on, so
    serve's own cleanup does not always run (Linux's PR_SET_PDEATHSIG; elsewhere nothing)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def worker_processes_stop(processes: list[subprocess.Popen], *, timeout: float = 5.0) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
