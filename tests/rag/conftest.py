"""RAG fixtures: a fake engine whose embeddings are a 256-dimension hashed bag of words
(similar texts are near) and whose rerank scores word overlap, registered as models
`rag-embed`, `rag-rerank` and `rag-chat`; a helper that runs the queued ingestion jobs in
this process, as `manage.py rag_worker --once` would."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import psutil
import pytest

from tests.fake_engine import FakeEngineProcess

EMBED, RERANK, CHAT = "rag-embed", "rag-rerank", "rag-chat"
DIMS = 256


@pytest.fixture(scope="session")
def rag_fake_engine() -> Iterator[FakeEngineProcess]:
    args = ["--model", CHAT, "--model", EMBED, "--model", RERANK, "--embedding-dims", str(DIMS)]
    with FakeEngineProcess().start(*args) as engine:
        yield engine


@pytest.fixture
def rag_engine(db, rag_fake_engine):
    from apps.engines.services import engine_register_external

    rag_fake_engine.reset()
    return engine_register_external(
        name="rag-fake",
        base_url=rag_fake_engine.url,
        models=[CHAT, EMBED, RERANK],
        ctx_size=8192,
        slots=4,
    )


def run_jobs() -> None:
    """Run every queued ingestion job to its end (in a fresh event loop)."""
    from apps.rag.worker import worker_run

    asyncio.run(worker_run(concurrency=1, wait=False))


def corpus_for(tenant, **fields):
    from apps.rag.services import corpus_create

    return corpus_create(
        tenant=tenant, name=fields.pop("name", "docs"), embedding_model=EMBED, **fields
    )


def upload(corpus, name: str, data: bytes):
    from apps.rag.services import document_upload

    return document_upload(corpus=corpus, filename=name, data=data)[0]


@pytest.fixture(autouse=True)
def _fresh_registry(settings):
    """Each test sees the engines it registered (no in-process registry cache)."""
    settings.REGISTRY_CACHE_SECONDS = 0


@pytest.fixture(scope="module")
def rag_gateway(django_db_setup, django_db_blocker, tmp_path_factory):
    """A real `manage.py serve` with one ingestion worker beside it (RAG_SERVE_WORKERS=1),
    per module: its worker must not take the jobs of in-process tests in other modules."""
    from django.db import connection

    from tests.conftest import start_gateway

    log_path = tmp_path_factory.mktemp("rag-gateway") / "gateway.log"
    env = {"RAG_SERVE_WORKERS": "1", "RAG_EMBED_RETRY_SECONDS": "0.05"}
    gateway = start_gateway(connection.settings_dict, log_path, env=env)
    yield gateway
    children = psutil.Process(gateway.process.pid).children(recursive=True)
    gateway.stop()
    # The ingestion worker stops on its own (SIGTERM when serve exits): wait for it, so the
    # test database is not dropped under its connections.
    _, alive = psutil.wait_procs(children, timeout=15)
    for process in alive:
        process.kill()


@pytest.fixture
def rag_client(rag_gateway, alice):
    import openai

    return openai.OpenAI(base_url=rag_gateway.base_url, api_key=alice.raw_key, max_retries=0)


def queued_jobs() -> int:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM procrastinate_jobs WHERE status IN ('todo', 'doing') "
            "AND task_name = 'rag.ingest_document'"
        )
        return cursor.fetchone()[0]


@pytest.fixture(autouse=True)
def _idle_ingestion_worker(request):
    """After a test with a serve process, let its worker finish what the test queued
    before the test's tables are emptied (the flush and a running job would deadlock)."""
    yield
    if "rag_gateway" in request.fixturenames:
        from tests.conftest import wait_until

        wait_until(lambda: queued_jobs() == 0, timeout=60, interval=0.1)


@pytest.fixture(scope="module", autouse=True)
def _flush_retries_deadlocks():
    """A serve process's ingestion worker polls the job tables while a transactional test's
    flush empties them; PostgreSQL may then pick the flush as a deadlock victim. Try the
    flush again (only this module's tests, only on a deadlock)."""
    from django.test.testcases import TransactionTestCase

    def deadlocked(exc: BaseException | None) -> bool:
        while exc is not None:
            if "deadlock detected" in str(exc):
                return True
            exc = exc.__cause__ or exc.__context__
        return False

    original = TransactionTestCase._fixture_teardown

    def teardown(self):
        for attempt in range(5):
            try:
                return original(self)
            except Exception as exc:  # flush wraps the driver's error in CommandError
                if not deadlocked(exc) or attempt == 4:
                    raise
                time.sleep(0.2)

    TransactionTestCase._fixture_teardown = teardown
    yield
    TransactionTestCase._fixture_teardown = original
