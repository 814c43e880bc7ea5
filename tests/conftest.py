"""Shared fixtures: real processes on loopback (fake engine, gateway) and tenant helpers.

Alice, Bob and Charlie are tenants with one API key each. End-to-end tests drive a real
`manage.py serve` process through the official OpenAI SDK; that process reads the test
database, so those tests use transactional DB access (their writes must be committed).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from tests.fake_engine import FakeEngineProcess

ROOT = Path(__file__).resolve().parent.parent
FAKE_MODEL = "fake-model"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def database_url(settings_dict: dict) -> str:
    """A DATABASE_URL for a subprocess, pointing at the (test) database in use."""
    user = quote(settings_dict.get("USER") or "")
    password = quote(settings_dict.get("PASSWORD") or "")
    host = settings_dict.get("HOST") or settings_dict.get("OPTIONS", {}).get("host", "")
    port = settings_dict.get("PORT") or settings_dict.get("OPTIONS", {}).get("port", "")
    name = settings_dict["NAME"]
    if str(host).startswith("/"):  # Unix socket directory (the embedded server)
        return f"postgresql://{user}:{password}@/{name}?host={quote(str(host))}&port={port}"
    return f"postgresql://{user}:{password}@{host}:{port}/{name}"


def wait_until(check: Callable[[], object], *, timeout: float = 10.0, interval: float = 0.05):
    """Poll `check` until it returns something truthy; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


@dataclass
class GatewayProcess:
    url: str
    process: subprocess.Popen
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def output(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_gateway(
    settings_dict: dict, log_path: Path, *, workers: int = 1, env: dict | None = None
) -> GatewayProcess:
    port = free_port()
    full_env = {
        **os.environ,
        "DATABASE_URL": database_url(settings_dict),
        # No caching in end-to-end tests: each request sees what the test just wrote.
        "AUTH_CACHE_SECONDS": "0",
        "REGISTRY_CACHE_SECONDS": "0",
        "REQUEST_LOG_FLUSH_SECONDS": "0.05",
        "SAFETY_RULES_CACHE_SECONDS": "0",
        "SAFETY_EVENT_FLUSH_SECONDS": "0.05",
        # A quota lease ends at its first idle renewal, so none outlives the test that took
        # it (a lease kept idle would settle during the next test's table flush).
        "QUOTA_LEASE_IDLE_SECONDS": "0",
        "ADMIN_PASSWORD": "admin-test-password",
        # Engine managers of gateway processes would take over the replicas that the
        # in-process managers of tests/engines own; tests of managed engines turn it on.
        "ENGINE_MANAGER_AUTOSTART": "0",
        # No RAG ingestion worker unless a test asks for one (tests/rag).
        "RAG_SERVE_WORKERS": "0",
        **(env or {}),
    }
    log = log_path.open("w")
    process = subprocess.Popen(
        [sys.executable, "manage.py", "serve", "--port", str(port), "--workers", str(workers)],
        cwd=ROOT,
        env=full_env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    gateway = GatewayProcess(url=f"http://127.0.0.1:{port}", process=process, log_path=log_path)

    def healthy() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"gateway exited early:\n{gateway.output()}")
        try:
            return httpx.get(f"{gateway.url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(healthy, timeout=60, interval=0.2)
    return gateway


@pytest.fixture(scope="session")
def django_db_modify_db_settings(django_db_modify_db_settings_parallel_suffix) -> None:
    """A test database per pytest run, so concurrent runs on one cluster never collide."""
    from django.conf import settings

    settings.DATABASES["default"]["TEST"]["NAME"] = f"test_gateway_{os.getpid()}"
    # In-process async tests use worker threads; close their connections after each call
    # so the test database can be dropped at the end.
    settings.DATABASES["default"]["CONN_MAX_AGE"] = 0


@pytest.fixture(scope="session")
def fake_engine() -> Iterator[FakeEngineProcess]:
    with FakeEngineProcess().start("--model", FAKE_MODEL, "--model", "other-model") as engine:
        yield engine


@pytest.fixture(scope="session")
def gateway(django_db_setup, django_db_blocker, tmp_path_factory) -> Iterator[GatewayProcess]:
    from django.db import connection

    log_path = tmp_path_factory.mktemp("gateway") / "gateway.log"
    gateway = start_gateway(connection.settings_dict, log_path)
    yield gateway
    gateway.stop()


@pytest.fixture(scope="session", autouse=True)
def _flush_retries_deadlocks() -> Iterator[None]:
    """A test's table flush (one TRUNCATE of every table) can still deadlock with a write
    a gateway process makes late for that test (see _let_the_gateway_settle); PostgreSQL
    then rolls the whole flush back, so it is simply run again."""
    from django.db import OperationalError
    from django.db.backends.base.operations import BaseDatabaseOperations

    flush = BaseDatabaseOperations.execute_sql_flush

    def flush_retrying(self, sql_list: list[str]) -> None:
        for attempt in range(3):
            try:
                return flush(self, sql_list)
            except OperationalError as exc:
                if "deadlock detected" not in str(exc) or attempt == 2:
                    raise
                time.sleep(0.2)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(BaseDatabaseOperations, "execute_sql_flush", flush_retrying)
        yield


@pytest.fixture(autouse=True)
def _let_the_gateway_settle(request) -> Iterator[None]:
    """After an end-to-end test, give its gateway processes time to write their batched
    request logs (REQUEST_LOG_FLUSH_SECONDS is 0.05 here), so the test's table flush never
    races with (or deadlocks against) that write: whatever the gateway fixture's name."""
    yield
    if any(isinstance(value, GatewayProcess) for value in request.node.funcargs.values()):
        time.sleep(0.15)


@dataclass
class TenantKey:
    tenant: object
    api_key: object
    raw_key: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.raw_key}"}


def make_tenant(slug: str) -> TenantKey:
    from apps.tenants.services import api_key_create, tenant_create

    tenant = tenant_create(slug=slug, name=slug.title())
    created = api_key_create(tenant=tenant, name="default")
    return TenantKey(tenant=tenant, api_key=created.api_key, raw_key=created.raw_key)


@pytest.fixture
def alice(db) -> TenantKey:
    return make_tenant("alice")


@pytest.fixture
def bob(db) -> TenantKey:
    return make_tenant("bob")


@pytest.fixture
def charlie(db) -> TenantKey:
    return make_tenant("charlie")


@pytest.fixture
def engine(db, fake_engine):
    """The fake engine registered as `fake`, serving `fake-model` and `other-model`."""
    from apps.engines.services import engine_register_external

    fake_engine.reset()
    return engine_register_external(
        name="fake", base_url=fake_engine.url, models=[FAKE_MODEL, "other-model"], ctx_size=4096
    )


@pytest.fixture
def openai_client(gateway, alice):
    import openai

    return openai.OpenAI(base_url=gateway.base_url, api_key=alice.raw_key, max_retries=0)


@pytest.fixture
def async_openai_client(gateway, alice):
    import openai

    return openai.AsyncOpenAI(base_url=gateway.base_url, api_key=alice.raw_key, max_retries=0)


def request_logs(**filters) -> list:
    """Committed request logs (the gateway writes them in batches, so poll)."""
    from apps.request_logs.models import RequestLog

    return list(RequestLog.objects.filter(**filters).order_by("created_at"))


@pytest.fixture
def data_dir():
    """A fresh DATA_DIR (its own embedded PostgreSQL, never migrated) outside pytest's tmp
    root: that root is 0700 and re-restricted by every pytest session, while the embedded
    server runs as another (system) user."""
    path = Path(tempfile.mkdtemp(prefix="fresh-data-", dir=ROOT / "var"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def manage(data_dir: Path, *args: str) -> subprocess.CompletedProcess:
    """`manage.py <args>` in a subprocess on `data_dir`'s own database."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "ADMIN_PASSWORD")}
    env["DATA_DIR"] = str(data_dir)
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
