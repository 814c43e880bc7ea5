"""A gateway with short tool limits and web_search pointed at a fake SearxNG server."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest

from tests.conftest import GatewayProcess, start_gateway

TOOLS_ENV = {
    "TOOLS_TIMEOUT_SECONDS": "2",
    "TOOLS_CPU_SECONDS": "2",
    "TOOLS_MAX_ROUNDS": "3",
    "TOOLS_MAX_OUTPUT_BYTES": "4096",
}


class FakeSearx(BaseHTTPRequestHandler):
    """SearxNG's JSON API: GET /search?q=...&format=json."""

    queries: list[str] = []

    def do_GET(self) -> None:
        url = urlparse(self.path)
        query = parse_qs(url.query)
        if url.path != "/search" or query.get("format") != ["json"]:
            self.send_error(400)
            return
        q = query["q"][0]
        self.queries.append(q)
        results = [
            {
                "title": f"Result {i} for {q}",
                "url": f"https://example.org/{i}",
                "content": f"about {q}",
            }
            for i in range(8)
        ]
        body = json.dumps({"query": q, "results": results}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="session")
def searx_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeSearx)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/search"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def tools_gateway(
    django_db_setup, django_db_blocker, tmp_path_factory, searx_url
) -> Iterator[GatewayProcess]:
    from django.db import connection

    log_path = tmp_path_factory.mktemp("tools-gateway") / "gateway.log"
    env = {**TOOLS_ENV, "TOOLS_SEARXNG_URL": searx_url}
    gateway = start_gateway(connection.settings_dict, log_path, env=env)
    yield gateway
    gateway.stop()


@pytest.fixture(autouse=True)
def _let_the_tools_gateway_settle(request) -> Iterator[None]:
    """As tests/conftest.py does for `gateway`: its batched writes land before the flush."""
    yield
    if "tools_gateway" in request.fixturenames:
        time.sleep(0.15)
