"""The ingestion queue's backlog, as GET /health/detailed reports it."""

from __future__ import annotations

import pytest

from apps.rag.selectors import ingestion_backlog
from tests.rag.conftest import corpus_for, run_jobs, upload

pytestmark = pytest.mark.django_db(transaction=True)


def test_it_counts_waiting_jobs_and_how_long_the_oldest_waited(rag_engine, alice):
    corpus = corpus_for(alice.tenant)
    assert ingestion_backlog()["waiting"] == 0
    upload(corpus, "a.txt", b"otters hold hands")
    upload(corpus, "b.txt", b"bees dance")

    queued = ingestion_backlog()
    assert (queued["waiting"], queued["running"], queued["failed"]) == (2, 0, 0)
    assert queued["oldest_waiting_seconds"] >= 0
    run_jobs()
    done = ingestion_backlog()
    assert (done["waiting"], done["oldest_waiting_seconds"]) == (0, None)


def test_detailed_health_reports_the_backlog(rag_engine, alice, admin_client):
    upload(corpus_for(alice.tenant), "a.txt", b"otters hold hands")

    queue = admin_client.get("/health/detailed").json()["task_queue"]

    assert queue["backend"] == "procrastinate"
    assert queue["waiting"] == 1
