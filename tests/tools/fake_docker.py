"""A fake Docker Engine API on loopback: enough of it for the docker SDK's container
create/start/wait/logs/kill/remove, recording every request (the create body above all),
so the docker backend's container settings can be checked without a Docker engine."""

from __future__ import annotations

import json
import re
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

CONTAINER_ID = "f" * 64


@dataclass
class FakeDocker:
    """What the fake containers do, and what the SDK asked for."""

    url: str = ""
    exit_code: int = 0
    stdout: bytes = b""
    stderr: bytes = b""
    run_seconds: float = 0.0  # how long /wait blocks (longer than the timeout: timed out)
    requests: list[tuple[str, str, Any]] = field(default_factory=list)
    killed: threading.Event = field(default_factory=threading.Event)
    removed: threading.Event = field(default_factory=threading.Event)

    def paths(self, method: str) -> list[str]:
        return [path for m, path, _ in self.requests if m == method]

    def create_body(self) -> dict[str, Any]:
        return next(body for m, p, body in self.requests if p.endswith("/containers/create"))


def _frames(stream: int, data: bytes) -> bytes:
    """Docker's multiplexed log format (no TTY): an 8-byte header per frame."""
    return struct.pack(">BxxxL", stream, len(data)) + data if data else b""


def _handler(fake: FakeDocker) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _body(self) -> Any:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            return json.loads(raw) if raw else None

        def _send(self, status: int, payload: Any = None, raw: bytes | None = None) -> None:
            body = (
                raw
                if raw is not None
                else (json.dumps(payload).encode() if payload is not None else b"")
            )
            self.send_response(status)
            content_type = (
                "application/vnd.docker.raw-stream" if raw is not None else "application/json"
            )
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _route(self, method: str) -> None:
            body = self._body()
            fake.requests.append((method, self.path, body))
            path = re.sub(r"^/v[0-9.]+", "", self.path.split("?")[0])
            if path == "/_ping":
                self._send(200, raw=b"OK")
            elif method == "POST" and path == "/containers/create":
                self._send(201, {"Id": CONTAINER_ID, "Warnings": []})
            elif method == "GET" and path == f"/containers/{CONTAINER_ID}/json":
                self._send(200, {"Id": CONTAINER_ID, "Config": {"Tty": False}, "State": {}})
            elif method == "POST" and path.endswith("/start"):
                self._send(204)
            elif method == "POST" and path.endswith("/wait"):
                deadline = time.monotonic() + fake.run_seconds
                while (
                    time.monotonic() < deadline
                    and not fake.killed.is_set()
                    and not fake.removed.is_set()
                ):
                    time.sleep(0.02)
                self._send(200, {"StatusCode": 137 if fake.killed.is_set() else fake.exit_code})
            elif method == "GET" and path.endswith("/logs"):
                stream = (1, fake.stdout) if "stdout=1" in self.path else (2, fake.stderr)
                self._send(200, raw=_frames(*stream))
            elif method == "POST" and path.endswith("/kill"):
                fake.killed.set()
                self._send(204)
            elif method == "DELETE" and path == f"/containers/{CONTAINER_ID}":
                fake.removed.set()
                self._send(204)
            else:
                self._send(404, {"message": f"fake docker: no route {method} {path}"})

        def do_GET(self) -> None:
            self._route("GET")

        def do_POST(self) -> None:
            self._route("POST")

        def do_DELETE(self) -> None:
            self._route("DELETE")

        def do_HEAD(self) -> None:
            self._route("HEAD")

        def log_message(self, *args: object) -> None:
            pass

    return Handler


@contextmanager
def fake_docker() -> Iterator[FakeDocker]:
    fake = FakeDocker()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    fake.url = f"tcp://127.0.0.1:{server.server_address[1]}"
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
