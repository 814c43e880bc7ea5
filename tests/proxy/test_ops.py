"""/metrics and /health/detailed access rules (in process, Django's test client)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.django_db


def test_detailed_health_needs_a_staff_session_without_a_token(client, django_user_model, engine):
    assert client.get("/health/detailed").status_code == 401
    user = django_user_model.objects.create_user("ann", password="pw-123456789")
    client.force_login(user)
    assert client.get("/health/detailed").status_code == 401  # signed in, not staff
    user.is_staff = True
    user.save()
    response = client.get("/health/detailed")
    assert response.status_code == 200
    assert [e["name"] for e in response.json()["engines"]] == ["fake"]


def test_detailed_health_ignores_a_bearer_when_no_token_is_set(client, settings):
    settings.METRICS_TOKEN = ""
    response = client.get("/health/detailed", headers={"Authorization": "Bearer "})
    assert response.status_code == 401


def test_metrics_are_open_without_a_token_and_name_the_gateway_metrics(client, settings):
    settings.METRICS_TOKEN = ""
    response = client.get("/metrics")
    assert response.status_code == 200
    text = response.content.decode()
    for name in (
        "gateway_requests_total",
        "gateway_request_duration_seconds",
        "gateway_time_to_first_token_seconds",
        "gateway_tokens_total",
        "gateway_engine_in_flight",
        "gateway_engine_queued",
        "gateway_engine_starts_total",
        "gateway_quota_refusals_total",
        "gateway_rate_limit_refusals_total",
        "gateway_cache_lookups_total",
    ):
        assert f"# HELP {name}" in text, name


def test_metrics_with_a_token_refuse_a_staff_session(admin_client, settings):
    settings.METRICS_TOKEN = "t0k3n"
    assert admin_client.get("/metrics").status_code == 401
    ok = admin_client.get("/metrics", headers={"Authorization": "Bearer t0k3n"})
    assert ok.status_code == 200
