"""A circuit breaker per engine replica, in each gateway process.

After CIRCUIT_BREAKER_FAILURES consecutive failures (connection refused, 502/503/504) a
replica is skipped for CIRCUIT_BREAKER_COOLDOWN_SECONDS; then one request at a time is let
through as a probe (again once per cool-down), and the first success closes the circuit.

Per process, in memory: a breaker costs nothing on the hot path and needs no shared store;
each worker learns an engine is down from its own failures (a few requests per worker at
most, each retried elsewhere). /health/detailed and the admin show the answering
process's view.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from django.conf import settings

from apps.observability import metrics

Key = tuple[str, int]  # (engine name, replica)


@dataclass(slots=True)
class Circuit:
    failures: int = 0
    open_until: float = 0.0  # monotonic; 0 while closed
    last_error: str = ""
    opened: int = 0  # times it opened, for the admin and health

    @property
    def is_open(self) -> bool:
        return self.open_until > 0


class Breaker:
    def __init__(self) -> None:
        self._circuits: dict[Key, Circuit] = {}

    def allows(self, engine: str, replica: int) -> bool:
        """May a request go to this replica now? An open circuit past its cool-down lets
        this one request through as the probe and waits another cool-down for the next."""
        circuit = self._circuits.get((engine, replica))
        if circuit is None or not circuit.is_open:
            return True
        now = time.monotonic()
        if now < circuit.open_until:
            return False
        circuit.open_until = now + settings.CIRCUIT_BREAKER_COOLDOWN_SECONDS
        return True

    def success(self, engine: str, replica: int) -> None:
        circuit = self._circuits.get((engine, replica))
        if circuit is not None and (circuit.failures or circuit.is_open):
            circuit.failures, circuit.open_until = 0, 0.0

    def failure(self, engine: str, replica: int, error: str) -> None:
        circuit = self._circuits.setdefault((engine, replica), Circuit())
        circuit.failures += 1
        circuit.last_error = error
        if circuit.failures >= settings.CIRCUIT_BREAKER_FAILURES:
            if not circuit.is_open:
                circuit.opened += 1
                metrics.CIRCUIT_OPENS.labels(engine).inc()
            circuit.open_until = time.monotonic() + settings.CIRCUIT_BREAKER_COOLDOWN_SECONDS

    def state(self, engine: str, replica: int) -> dict:
        """For health and the admin: closed/open/half-open, failures, last error."""
        circuit = self._circuits.get((engine, replica))
        if circuit is None:
            return {"state": "closed", "failures": 0}
        if not circuit.is_open:
            state = "closed"
        elif time.monotonic() < circuit.open_until:
            state = "open"
        else:
            state = "half-open"
        return {
            "state": state,
            "failures": circuit.failures,
            "opened": circuit.opened,
            "last_error": circuit.last_error,
        }

    def reset(self) -> None:
        self._circuits.clear()


breaker = Breaker()
