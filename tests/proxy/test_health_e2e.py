"""GET /health needs no key and reports the database and each engine replica."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from pathlib import Path

import httpx
import pytest
from django.utils import timezone

from apps.engines.models import Engine, EngineInstance
from apps.engines.services import engine_register_external
from tests.conftest import free_port, start_gateway, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

MANAGED_COMMAND = "{python} tests/fake_engine.py --port {port}"


def engines_of(gateway) -> dict[str, dict]:
    return {e["name"]: e for e in httpx.get(f"{gateway.url}/health").json()["engines"]}


def test_it_reports_database_and_engines(engine, gateway, fake_engine):
    engine_register_external(name="gone", base_url=f"http://127.0.0.1:{free_port()}", models=["g"])
    response = httpx.get(f"{gateway.url}/health")
    assert response.status_code == 200
    body = response.json()
    assert body["database"] == {"ok": True}
    engines = {e["name"]: e for e in body["engines"]}
    assert engines["fake"]["ok"] is True
    assert engines["fake"]["kind"] == "external"
    assert engines["fake"]["replicas"][0]["url"] == f"{fake_engine.url}/health"
    assert engines["gone"]["ok"] is False
    assert "error" in engines["gone"]["replicas"][0]
    assert body["status"] == "degraded"


def test_it_is_ok_when_everything_answers(engine, gateway):
    body = httpx.get(f"{gateway.url}/health").json()
    assert body["status"] == "ok"


def test_it_probes_generic_engines_on_their_model_list(gateway, fake_engine):
    engine_register_external(
        name="generic", base_url=fake_engine.url, models=["m"], flavor="openai"
    )
    [replica] = engines_of(gateway)["generic"]["replicas"]
    assert replica == {
        **replica,
        "replica": 0,
        "ok": True,
        "status_code": 200,
        "url": f"{fake_engine.url}/v1/models",
    }


def test_it_probes_every_replica_of_an_external_engine(gateway, fake_engine):
    dead = f"http://127.0.0.1:{free_port()}"
    Engine.objects.create(name="pair", base_url=fake_engine.url, extra_base_urls=[dead])
    engine = engines_of(gateway)["pair"]
    assert [(r["replica"], r["url"], r["ok"]) for r in engine["replicas"]] == [
        (0, f"{fake_engine.url}/health", True),
        (1, f"{dead}/health", False),
    ]
    assert "error" in engine["replicas"][1]
    assert engine["ok"] is False


def test_it_reports_managed_replicas_from_their_published_state(gateway, fake_engine):
    managed = Engine.objects.create(
        name="managed", kind=Engine.Kind.MANAGED, command_template=MANAGED_COMMAND, replicas=3
    )
    EngineInstance.objects.create(
        engine=managed,
        replica=0,
        state=EngineInstance.State.RUNNING,
        base_url=fake_engine.url,
        owner_pid=os.getpid(),  # a live owner's heartbeat: the state is believed
        heartbeat_at=timezone.now(),
    )
    EngineInstance.objects.create(
        engine=managed, replica=1, state=EngineInstance.State.FAILED, last_error="no such model"
    )
    # Replica 2 was never started: no row, and it starts on the next request.
    body = httpx.get(f"{gateway.url}/health").json()
    [engine] = body["engines"]
    assert (engine["name"], engine["kind"], engine["ok"]) == ("managed", "managed", False)
    running, failed, stopped = engine["replicas"]
    assert running == {
        **running,
        "replica": 0,
        "state": "running",
        "ok": True,
        "url": f"{fake_engine.url}/health",
        "status_code": 200,
    }
    assert failed == {"replica": 1, "state": "failed", "ok": False, "error": "no such model"}
    assert stopped == {"replica": 2, "state": "stopped", "ok": True}
    assert body["status"] == "degraded"


def test_it_is_ok_with_a_managed_engine_that_waits_for_its_first_request(gateway):
    Engine.objects.create(name="lazy", kind=Engine.Kind.MANAGED, command_template=MANAGED_COMMAND)
    body = httpx.get(f"{gateway.url}/health").json()
    assert body["status"] == "ok"
    assert body["engines"][0]["replicas"] == [{"replica": 0, "state": "stopped", "ok": True}]


def test_it_answers_head_like_get_without_a_body(engine, gateway):
    response = httpx.head(f"{gateway.url}/health")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.content == b""


class DatabaseLink:
    """A TCP relay to the test database's Unix socket: cutting it is a database outage."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self.port = free_port()
        self._sockets: list[socket.socket] = []

    def up(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def down(self) -> None:
        for sock in [self._listener, *self._sockets]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the threads blocked on it
            sock.close()
        self._sockets.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # the link was cut
            server = socket.socket(socket.AF_UNIX)
            server.connect(str(self.socket_path))
            self._sockets += [client, server]
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def database_link(django_db_setup) -> DatabaseLink:
    from django.db import connection

    settings = connection.settings_dict
    if not str(settings["HOST"]).startswith("/"):
        pytest.skip("the relay speaks to the embedded server's Unix socket")
    link = DatabaseLink(Path(settings["HOST"]) / f".s.PGSQL.{settings['PORT']}")
    link.up()
    yield link
    link.down()


def health_with_status(url: str, status: int) -> dict | None:
    """/health's body if it answered `status`, else None (for wait_until)."""
    response = httpx.get(f"{url}/health", timeout=10)
    return response.json() if response.status_code == status else None


def test_it_answers_503_down_while_the_database_is_unreachable(database_link, tmp_path):
    from django.db import connection

    settings = {**connection.settings_dict, "HOST": "127.0.0.1", "PORT": database_link.port}
    gateway = start_gateway(settings, tmp_path / "gateway.log")
    try:
        database_link.down()
        body = wait_until(lambda: health_with_status(gateway.url, 503))
        assert body["status"] == "down"
        assert body["database"]["ok"] is False
        assert body["database"]["error"]
        assert body["engines"] == []
        database_link.up()  # the database is back: so is the gateway, without a restart
        assert wait_until(lambda: health_with_status(gateway.url, 200))["status"] == "ok"
    finally:
        gateway.stop()
