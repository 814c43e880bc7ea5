"""The circuit breaker: opens after N consecutive failures, probes after the cool-down."""

from __future__ import annotations

import time

import pytest

from apps.engines.breaker import Breaker


@pytest.fixture
def breaker(settings) -> Breaker:
    settings.CIRCUIT_BREAKER_FAILURES = 2
    settings.CIRCUIT_BREAKER_COOLDOWN_SECONDS = 0.2
    return Breaker()


def test_it_opens_after_consecutive_failures_only(breaker):
    breaker.failure("e", 0, "refused")
    breaker.success("e", 0)
    breaker.failure("e", 0, "refused")
    assert breaker.allows("e", 0)
    breaker.failure("e", 0, "refused again")
    assert not breaker.allows("e", 0)
    assert breaker.allows("e", 1)  # per replica
    assert breaker.state("e", 0) == {
        "state": "open", "failures": 2, "opened": 1, "last_error": "refused again",
    }  # fmt: skip


def test_it_lets_one_probe_through_after_the_cool_down(breaker):
    breaker.failure("e", 0, "x")
    breaker.failure("e", 0, "x")
    time.sleep(0.25)
    assert breaker.state("e", 0)["state"] == "half-open"
    assert breaker.allows("e", 0)  # the probe
    assert not breaker.allows("e", 0)  # nobody else until it answers
    breaker.failure("e", 0, "still down")
    assert not breaker.allows("e", 0)
    time.sleep(0.25)
    assert breaker.allows("e", 0)
    breaker.success("e", 0)
    assert breaker.state("e", 0)["state"] == "closed"
    assert breaker.allows("e", 0)
    assert breaker.allows("e", 0)


@pytest.mark.django_db
def test_the_admin_shows_each_replicas_circuit(admin_client, engine, settings):
    from apps.engines.breaker import breaker as process_breaker

    settings.CIRCUIT_BREAKER_FAILURES = 2
    try:
        process_breaker.failure("fake", 0, "connection refused")
        process_breaker.failure("fake", 0, "connection refused")
        html = admin_client.get("/admin/engines/engine/").content.decode()
        assert "#0 open (2 failures: connection refused)" in html
    finally:
        process_breaker.reset()
    assert "#0 closed" in admin_client.get("/admin/engines/engine/").content.decode()


@pytest.mark.django_db
def test_the_admin_edits_and_lists_a_models_fallbacks(admin_client, engine):
    from apps.engines.models import ServedModel

    model = ServedModel.objects.get(name="fake-model")
    variant = model.variants.get()
    INLINE = {
        "variants-TOTAL_FORMS": "1", "variants-INITIAL_FORMS": "1",
        "variants-MIN_NUM_FORMS": "0", "variants-MAX_NUM_FORMS": "1000",
        "variants-0-id": str(variant.pk), "variants-0-model": str(model.pk),
    }  # fmt: skip
    url = f"/admin/engines/servedmodel/{model.pk}/change/"
    response = admin_client.post(url, {"name": "fake-model", "fallbacks": "nope", **INLINE})
    assert "No such model: nope." in response.content.decode()
    response = admin_client.post(url, {"name": "fake-model", "fallbacks": "other-model", **INLINE})
    assert response.status_code == 302, response.content.decode()[:2000]
    model.refresh_from_db()
    assert model.fallbacks == ["other-model"]
    assert "other-model" in admin_client.get("/admin/engines/servedmodel/").content.decode()
