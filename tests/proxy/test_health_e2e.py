"""GET /health needs no key and reports the database and each engine."""

from __future__ import annotations

import httpx
import pytest

from apps.engines.services import engine_register_external
from tests.conftest import free_port

pytestmark = pytest.mark.django_db(transaction=True)


def test_it_reports_database_and_engines(engine, gateway):
    engine_register_external(name="gone", base_url=f"http://127.0.0.1:{free_port()}", models=["g"])
    response = httpx.get(f"{gateway.url}/health")
    assert response.status_code == 200
    body = response.json()
    assert body["database"] == {"ok": True}
    engines = {e["name"]: e for e in body["engines"]}
    assert engines["fake"]["ok"] is True
    assert engines["fake"]["url"].endswith("/health")
    assert engines["gone"]["ok"] is False
    assert "error" in engines["gone"]
    assert body["status"] == "degraded"


def test_it_is_ok_when_everything_answers(engine, gateway):
    body = httpx.get(f"{gateway.url}/health").json()
    assert body["status"] == "ok"


def test_it_probes_generic_engines_on_their_model_list(gateway, fake_engine):
    engine_register_external(
        name="generic", base_url=fake_engine.url, models=["m"], flavor="openai"
    )
    engines = httpx.get(f"{gateway.url}/health").json()["engines"]
    assert engines == [
        {**engines[0], "name": "generic", "ok": True, "url": f"{fake_engine.url}/v1/models"}
    ]
