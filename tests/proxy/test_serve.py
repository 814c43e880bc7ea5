"""`manage.py serve` on its own embedded PostgreSQL: first start, admin login, clean stop."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys

import httpx
import psutil

from tests.conftest import ROOT, free_port, wait_until


def start_serve(data_dir, port: int, *args: str, password: str | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "ADMIN_PASSWORD")}
    env["DATA_DIR"] = str(data_dir)
    if password:
        env["ADMIN_PASSWORD"] = password
    return subprocess.Popen(
        [sys.executable, "manage.py", "serve", "--port", str(port), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def read_until_admin_url(process: subprocess.Popen) -> list[str]:
    lines = []
    for line in process.stdout:
        lines.append(line.rstrip())
        if line.startswith("Admin:"):
            return lines
    raise AssertionError(f"serve exited without printing the admin URL: {lines}")


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health").status_code == 200
    except httpx.ConnectError:
        return False


def embedded_postgres_running(data_dir) -> bool:
    marker = str(data_dir / "postgres")
    for proc in psutil.process_iter(["name", "cmdline"]):
        if proc.info["name"] == "postgres" and marker in " ".join(proc.info["cmdline"] or []):
            return True
    return False


def worker_processes(serve: subprocess.Popen) -> list[psutil.Process]:
    """uvicorn's worker processes (multiprocessing spawns them; its resource tracker is
    another child, and is not a worker)."""
    children = psutil.Process(serve.pid).children()
    return [child for child in children if "spawn_main" in " ".join(child.cmdline())]


def holds_connection(worker: psutil.Process, port: int) -> bool:
    return any(
        conn.status == psutil.CONN_ESTABLISHED and conn.laddr.port == port
        for conn in worker.net_connections("tcp")
    )


def workers_answering(url: str, port: int, workers: list[psutil.Process]) -> set[int]:
    """Pids of the workers that accepted one of up to 20 kept-open connections.

    The workers share one listening socket and the kernel picks who accepts, so keep
    opening connections until each worker holds one (a few suffice in practice)."""
    answering: set[int] = set()
    with contextlib.ExitStack() as stack:
        for _ in range(20):
            client = stack.enter_context(httpx.Client(base_url=url))
            assert client.get("/health").status_code == 200
            answering = {worker.pid for worker in workers if holds_connection(worker, port)}
            if len(answering) == len(workers):
                break
    return answering


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=30)


def admin_login(url: str, password: str) -> httpx.Response:
    with httpx.Client(base_url=url, follow_redirects=False) as client:
        page = client.get("/admin/login/")
        token = client.cookies["csrftoken"]
        return (
            client.post(
                "/admin/login/?next=/admin/",
                data={"username": "admin", "password": password, "csrfmiddlewaretoken": token},
                headers={"Referer": f"{url}/admin/login/"},
            )
            if page.status_code == 200
            else page
        )


def test_it_migrates_creates_the_admin_and_prints_its_password_once(data_dir):
    port = free_port()
    process = start_serve(data_dir, port, "--workers", "2")
    try:
        lines = read_until_admin_url(process)
        password = re.search(r"password: (\S+)", "\n".join(lines)).group(1)
        assert lines[-1] == f"Admin: http://127.0.0.1:{port}/admin/"
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: healthy(url), timeout=30)
        assert admin_login(url, password).headers["location"] == "/admin/"
        workers = worker_processes(process)
        assert len(workers) == 2
        pids = {worker.pid for worker in workers}
        # /health answered once one worker was up; the other may still be starting.
        wait_until(lambda: workers_answering(url, port, workers) == pids, timeout=30)
    finally:
        stop(process)
    # SIGTERM (what systemd and docker send) stops the embedded PostgreSQL with the gateway.
    wait_until(lambda: not embedded_postgres_running(data_dir), timeout=15)

    process = start_serve(data_dir, port)
    try:
        lines = read_until_admin_url(process)
        assert not any("password" in line for line in lines)  # shown once, on first start only
    finally:
        stop(process)


def test_it_takes_the_admin_password_from_the_environment(data_dir):
    port = free_port()
    process = start_serve(data_dir, port, "--workers", "1", password="from-the-env-123")
    try:
        lines = read_until_admin_url(process)
        assert "Created superuser `admin` with the password from ADMIN_PASSWORD" in lines
        assert not any("from-the-env-123" in line for line in lines)  # never echoed
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: healthy(url), timeout=30)
        assert admin_login(url, "from-the-env-123").status_code == 302
        assert admin_login(url, "wrong-password").status_code == 200  # the form again
    finally:
        stop(process)
    wait_until(lambda: not embedded_postgres_running(data_dir), timeout=15)
