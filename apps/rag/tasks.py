"""Background jobs (procrastinate: a task queue in the PostgreSQL we already run, async,
any number of workers on any hosts; chosen over django-tasks for its locks, retries of
stalled jobs and periodic tasks).

A job takes a row lock when a worker fetches it, so no two workers run it; the `lock`
given when deferring keeps a document's jobs in sequence. A worker that crashes stops
sending heartbeats; its jobs are set to run again by `retry_stalled_jobs` (each minute and
when a worker starts).
"""

from __future__ import annotations

from django.conf import settings
from procrastinate.contrib.django import app

QUEUE = "rag"


@app.task(name="rag.ingest_document", queue=QUEUE)
async def ingest_document(document_id: int) -> None:
    from apps.rag.ingestion import ingest

    await ingest(document_id=document_id)


async def stalled_jobs_retry() -> int:
    # Ingestion jobs only: a stalled periodic job needs no retry (the next minute's runs).
    stalled = await app.job_manager.get_stalled_jobs(
        queue=QUEUE,
        task_name=ingest_document.name,
        seconds_since_heartbeat=settings.RAG_STALLED_JOB_SECONDS,
    )
    count = 0
    for job in stalled:
        await app.job_manager.retry_job(job)
        count += 1
    return count


@app.periodic(cron="* * * * *")
@app.task(name="rag.retry_stalled_jobs", queue=QUEUE, queueing_lock="rag.retry_stalled_jobs")
async def retry_stalled_jobs(timestamp: int) -> None:
    await stalled_jobs_retry()


@app.periodic(cron="* * * * *")
@app.task(name="rag.expire_vector_stores", queue=QUEUE, queueing_lock="rag.expire_vector_stores")
async def expire_vector_stores(timestamp: int) -> int:
    """Stores past their expires_at: marked expired, their chunks freed (searches on them
    are refused from that moment on anyway; this frees the space)."""
    from channels.db import database_sync_to_async

    from apps.rag.services import corpora_expire

    return await database_sync_to_async(corpora_expire, thread_sensitive=False)()
