"""Exactness under concurrency: many threads (each with its own database connection) and
several OS processes reserve against a nearly exhausted quota at the same moment.

Data must be committed for other connections to see it, hence transactional tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.utils import timezone

from apps.quotas import services
from apps.quotas.models import Quota, QuotaWindow, Reservation
from apps.quotas.services import (
    QuotaExceeded,
    quota_reserve,
    quota_set,
    quota_settle,
    reservations_release_stale,
)
from apps.tenants.services import api_key_create
from tests.conftest import ROOT, TenantKey, database_url

pytestmark = pytest.mark.django_db(transaction=True)

LIMIT = 10_000
REMAINING = 1_000
TOKENS = 30
REQUESTS = 50


@pytest.fixture(autouse=True)
def _no_opportunistic_sweep(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(services, "_last_sweep", float("inf"))


def nearly_exhaust(owner: TenantKey, *, period: str = "day", api_key: Any = None) -> Quota:
    """A quota of LIMIT tokens with only REMAINING left (used, not reserved)."""
    quota = quota_set(tenant=owner.tenant, tokens=LIMIT, period=period, api_key=api_key)
    ticket = quota_reserve(
        tenant_id=owner.tenant.pk, api_key_id=owner.api_key.pk, tokens=LIMIT - REMAINING
    )
    quota_settle(ticket=ticket, actual_tokens=LIMIT - REMAINING)
    return quota


def run_threads(count: int, work: Callable[[int], str]) -> list[str]:
    """Run work(i) in `count` threads released together; each closes its connection."""
    barrier = threading.Barrier(count)
    results: list[str] = [""] * count

    def target(i: int) -> None:
        try:
            barrier.wait()
            results[i] = work(i)
        except Exception as exc:
            results[i] = f"error: {exc!r}"
        finally:
            connection.close()

    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results


def reserve_or_refuse(tenant_id: int, key_id: int, *, settle: bool = False) -> str:
    try:
        ticket = quota_reserve(tenant_id=tenant_id, api_key_id=key_id, tokens=TOKENS)
    except QuotaExceeded:
        return "exceeded"
    if settle:
        quota_settle(ticket=ticket, actual_tokens=TOKENS)
    return "ok"


def windows_of(quota: Quota) -> list[QuotaWindow]:
    return list(QuotaWindow.objects.filter(quota=quota))


def assert_within_limits() -> None:
    for window in QuotaWindow.objects.select_related("quota"):
        assert window.used_tokens + window.reserved_tokens <= window.quota.limit_tokens


def test_it_grants_exactly_what_fits_to_concurrent_threads(alice: TenantKey) -> None:
    quota = nearly_exhaust(alice)

    results = run_threads(REQUESTS, lambda i: reserve_or_refuse(alice.tenant.pk, alice.api_key.pk))

    fits = REMAINING // TOKENS  # 33
    assert sorted(set(results)) == ["exceeded", "ok"], results
    assert results.count("ok") == fits
    [window] = windows_of(quota)
    assert (window.used_tokens, window.reserved_tokens) == (LIMIT - REMAINING, fits * TOKENS)
    assert Reservation.objects.count() == fits


def test_it_stays_exact_and_deadlock_free_with_shared_quotas(alice: TenantKey) -> None:
    """Two keys share the tenant's hour and day quotas and each has its own: all four
    windows are locked by every request, so lock order matters; each request also settles
    (actual == reserved, so what fits stays deterministic)."""
    second = api_key_create(tenant=alice.tenant, name="second").api_key
    hour = nearly_exhaust(alice, period="hour")
    day = quota_set(tenant=alice.tenant, tokens=LIMIT * 2, period="day")
    own = [
        quota_set(tenant=alice.tenant, tokens=20 * TOKENS, period="month", api_key=key)
        for key in (alice.api_key, second)
    ]
    keys = [alice.api_key.pk, second.pk]

    results = run_threads(
        REQUESTS, lambda i: reserve_or_refuse(alice.tenant.pk, keys[i % 2], settle=True)
    )

    # The hour's 1,000 remaining tokens bind (33 requests); each key could take 20.
    assert sorted(set(results)) == ["exceeded", "ok"], results
    assert results.count("ok") == REMAINING // TOKENS
    assert_within_limits()
    assert sum(w.reserved_tokens for w in QuotaWindow.objects.all()) == 0
    assert not Reservation.objects.exists()
    [hour_window] = windows_of(hour)
    assert hour_window.used_tokens == LIMIT - REMAINING + 33 * TOKENS
    assert sum(w.used_tokens for q in own for w in windows_of(q)) == 33 * TOKENS
    assert windows_of(day)[0].used_tokens == 33 * TOKENS  # created after the pre-use


def test_it_settles_exactly_while_sweeps_release_the_same_reservations(
    alice: TenantKey,
) -> None:
    """Settlements racing sweeps: every token is given back exactly once and every
    settlement is charged, whichever of the two reaches a reservation first."""
    quota = quota_set(tenant=alice.tenant, tokens=LIMIT, period="day")
    tickets = [
        quota_reserve(tenant_id=alice.tenant.pk, api_key_id=alice.api_key.pk, tokens=TOKENS)
        for _ in range(40)
    ]
    later = timezone.now() + timedelta(hours=1)

    def work(i: int) -> str:
        if i < len(tickets):
            quota_settle(ticket=tickets[i], actual_tokens=i)
        else:
            reservations_release_stale(now=later)
        return "ok"

    results = run_threads(len(tickets) + 8, work)

    assert set(results) == {"ok"}, results
    [window] = windows_of(quota)
    assert (window.used_tokens, window.reserved_tokens) == (sum(range(len(tickets))), 0)
    assert not Reservation.objects.exists()


def test_it_survives_a_quota_removed_while_requests_reserve(alice: TenantKey) -> None:
    tenant_wide = quota_set(tenant=alice.tenant, tokens=LIMIT, period="day")
    quota_set(tenant=alice.tenant, tokens=LIMIT, period="hour", api_key=alice.api_key)

    def work(i: int) -> str:
        if i == 0:
            quota_set(tenant=alice.tenant, tokens=0, period="hour", api_key=alice.api_key)
            return "removed"
        return reserve_or_refuse(alice.tenant.pk, alice.api_key.pk)

    results = run_threads(30, work)

    assert sorted(set(results)) == ["ok", "removed"], results
    assert windows_of(tenant_wide)[0].reserved_tokens == 29 * TOKENS
    assert list(Quota.objects.all()) == [tenant_wide]


def start_workers(
    processes: int, threads: int, *, tenant_id: int, key_ids: list[int], settle: bool
) -> list[subprocess.Popen]:
    env = {
        **os.environ,
        "DATABASE_URL": database_url(connection.settings_dict),
        "QUOTA_WORKER_TENANT_ID": str(tenant_id),
        "QUOTA_WORKER_KEY_IDS": ",".join(map(str, key_ids)),
        "QUOTA_WORKER_TOKENS": str(TOKENS),
        "QUOTA_WORKER_THREADS": str(threads),
        "QUOTA_WORKER_SETTLE": "1" if settle else "0",
    }
    code = "from tests.quotas.reserve_worker import main; main()"
    return [
        subprocess.Popen(
            # -v 0: no "objects imported automatically" banner before READY
            [sys.executable, "manage.py", "shell", "-v", "0", "-c", code],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]


def run_workers(workers: list[subprocess.Popen]) -> list[dict[str, Any]]:
    """Wait until every process is ready, release them together, collect their counts."""
    try:
        for worker in workers:
            line = worker.stdout.readline()
            if line.strip() != "READY":
                worker.kill()
                raise AssertionError(f"worker not ready: {line!r} {worker.stderr.read()}")
        for worker in workers:
            worker.stdin.write("go\n")
            worker.stdin.flush()
        outputs = []
        for worker in workers:
            out, err = worker.communicate(timeout=120)
            assert worker.returncode == 0, err
            outputs.append(json.loads(out.strip().splitlines()[-1]))
        return outputs
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()


def test_it_grants_exactly_what_fits_to_several_processes(alice: TenantKey) -> None:
    quota = nearly_exhaust(alice)
    workers = start_workers(
        5, REQUESTS // 5, tenant_id=alice.tenant.pk, key_ids=[alice.api_key.pk], settle=False
    )

    outputs = run_workers(workers)

    assert [o["errors"] for o in outputs] == [[]] * 5
    assert sum(o["ok"] for o in outputs) == REMAINING // TOKENS
    assert sum(o["exceeded"] for o in outputs) == REQUESTS - REMAINING // TOKENS
    [window] = windows_of(quota)
    assert window.used_tokens + window.reserved_tokens <= LIMIT
    assert window.reserved_tokens == (REMAINING // TOKENS) * TOKENS


def test_it_stays_exact_across_processes_with_shared_quotas_and_settles(
    alice: TenantKey,
) -> None:
    second = api_key_create(tenant=alice.tenant, name="second").api_key
    quota = nearly_exhaust(alice, period="month")
    quota_set(tenant=alice.tenant, tokens=LIMIT, period="hour", api_key=alice.api_key)
    quota_set(tenant=alice.tenant, tokens=LIMIT, period="hour", api_key=second)
    workers = start_workers(
        4,
        12,
        tenant_id=alice.tenant.pk,
        key_ids=[alice.api_key.pk, second.pk],
        settle=True,
    )

    outputs = run_workers(workers)

    assert [o["errors"] for o in outputs] == [[]] * 4
    assert sum(o["ok"] for o in outputs) == REMAINING // TOKENS
    assert_within_limits()
    [window] = windows_of(quota)
    assert (window.used_tokens, window.reserved_tokens) == (
        LIMIT - REMAINING + (REMAINING // TOKENS) * TOKENS,
        0,
    )
