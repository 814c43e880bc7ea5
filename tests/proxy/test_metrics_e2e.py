"""GET /metrics (Prometheus) and GET /health/detailed through `serve --workers 2`: the
workers' values add up, the bearer token guards both."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from apps.quotas.services import rate_limit_set
from tests.conftest import FAKE_MODEL, GatewayProcess, start_gateway

pytestmark = pytest.mark.django_db(transaction=True)

TOKEN = {"Authorization": "Bearer scrape-me"}


@pytest.fixture(scope="module")
def two_workers(django_db_setup, django_db_blocker, tmp_path_factory) -> Iterator[GatewayProcess]:
    from django.db import connection

    log_path = tmp_path_factory.mktemp("metrics") / "gateway.log"
    gateway = start_gateway(
        connection.settings_dict, log_path, workers=2, env={"METRICS_TOKEN": "scrape-me"}
    )
    yield gateway
    gateway.stop()


def scrape(gateway: GatewayProcess) -> dict[tuple[str, frozenset], float]:
    """Every sample by (name, labels); a fresh connection each time, so any worker answers."""
    response = httpx.get(f"{gateway.url}/metrics", headers=TOKEN)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def total(samples: dict, name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def chat(gateway: GatewayProcess, key, **body) -> httpx.Response:
    payload = {"model": FAKE_MODEL, "messages": [{"role": "user", "content": "hi"}], **body}
    return httpx.post(f"{gateway.base_url}/chat/completions", json=payload, headers=key.auth)


def test_it_adds_up_requests_and_tokens_across_workers(two_workers, alice, bob, engine):
    before = scrape(two_workers)
    for _ in range(12):
        assert chat(two_workers, alice).status_code == 200
    assert chat(two_workers, alice, stream=True).status_code == 200
    assert chat(two_workers, bob, fake={"error_status": 400}).status_code == 400
    # Whichever worker answers the scrape, it reports what both workers served.
    for _ in range(4):
        samples = scrape(two_workers)
        served = {"endpoint": "chat.completions", "model": FAKE_MODEL, "tenant": "alice"}
        assert (
            total(samples, "gateway_requests_total", **served, status="200")
            - total(before, "gateway_requests_total", **served, status="200")
            == 13
        )
        assert total(samples, "gateway_requests_total", tenant="bob", status="400") == 1
        assert total(samples, "gateway_tokens_total", tenant="alice", kind="completion") == 65
        assert total(samples, "gateway_tokens_total", tenant="alice", kind="prompt") == 13
        assert total(samples, "gateway_request_duration_seconds_count", model=FAKE_MODEL) >= 14
        assert total(samples, "gateway_time_to_first_token_seconds_count") >= 13
        assert total(samples, "gateway_tokens_per_second_count", model=FAKE_MODEL) >= 13
        assert total(samples, "gateway_engine_in_flight", engine="fake") == 0
        assert total(samples, "gateway_engine_queued", engine="fake") == 0


def test_it_counts_rate_limit_refusals(two_workers, alice, engine):
    rate_limit_set(tenant=alice.tenant, rpm=1)
    statuses = [chat(two_workers, alice).status_code for _ in range(3)]
    assert 429 in statuses
    refused = statuses.count(429)
    assert (
        total(scrape(two_workers), "gateway_rate_limit_refusals_total", tenant="alice") >= refused
    )


def test_metrics_need_the_token(two_workers):
    assert httpx.get(f"{two_workers.url}/metrics").status_code == 401
    wrong = httpx.get(f"{two_workers.url}/metrics", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert wrong.json()["error"]["message"]


def test_detailed_health_shows_engines_with_the_token_only(two_workers, engine):
    assert httpx.get(f"{two_workers.url}/health/detailed").status_code == 401
    response = httpx.get(f"{two_workers.url}/health/detailed", headers=TOKEN)
    assert response.status_code == 200
    health = response.json()
    assert health["status"] == "ok"
    assert health["database"]["ok"] is True
    (fake,) = [e for e in health["engines"] if e["name"] == "fake"]
    assert (fake["slots_in_use"], fake["queued"]) == (0, 0)
    assert fake["replicas"][0]["circuit"]["state"] == "closed"
    queue = health["task_queue"]
    assert queue["backend"] == "procrastinate"
    assert (queue["waiting"], queue["running"], queue["failed"]) == (0, 0, 0)
