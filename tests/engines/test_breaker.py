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
