"""Counts of what happens to corpora per UTC day (CorpusDay), for the operators' charts.

Ingestion counts once per document (when it turns ready or fails). A search counts once
per corpus searched: the tenant API and the page write it at once (a search there costs
an embedding call and several queries already); the chat path (rag_retrieve, on /v1)
only adds to an in-memory counter that a background task writes every
RAG_USAGE_FLUSH_SECONDS as one statement for all corpora, and once more at shutdown.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Iterable
from datetime import date

from channels.db import database_sync_to_async
from django.conf import settings
from django.db import connection
from django.utils import timezone

from apps.rag.models import Corpus, CorpusDay

logger = logging.getLogger(__name__)

COLUMNS = ("documents_ingested", "chunks_ingested", "failures", "searches")
_TABLE = CorpusDay._meta.db_table
# One statement for any number of (corpus, day) rows; corpora deleted meanwhile are
# skipped (the join), so one deleted corpus cannot lose the others' counts.
_UPSERT = (
    f"INSERT INTO {_TABLE} (corpus_id, day, {', '.join(COLUMNS)}) "
    f"SELECT v.corpus_id, v.day, {', '.join(f'v.{c}' for c in COLUMNS)} "
    "FROM unnest(%s::bigint[], %s::date[], %s::int[], %s::bigint[], %s::int[], %s::bigint[]) "
    f"AS v(corpus_id, day, {', '.join(COLUMNS)}) "
    f"JOIN {Corpus._meta.db_table} c ON c.id = v.corpus_id "
    "ON CONFLICT (corpus_id, day) DO UPDATE SET "
    + ", ".join(f"{c} = {_TABLE}.{c} + EXCLUDED.{c}" for c in COLUMNS)
)


def today() -> date:
    return timezone.now().date()  # UTC (USE_TZ)


def corpus_days_add(rows: dict[tuple[int, date], dict[str, int]]) -> None:
    """Add counts to (corpus id, day) rows, creating them as needed."""
    if not rows:
        return
    keys = sorted(rows)
    columns = [[rows[k].get(c, 0) for k in keys] for c in COLUMNS]
    with connection.cursor() as cursor:
        cursor.execute(_UPSERT, [[k[0] for k in keys], [k[1] for k in keys], *columns])


def ingestion_record(*, corpus_id: int, chunks: int = 0, failed: bool = False) -> None:
    """One document ingested (with its chunks), or one ingestion that failed."""
    counts = {"failures": 1} if failed else {"documents_ingested": 1, "chunks_ingested": chunks}
    corpus_days_add({(corpus_id, today()): counts})


def searches_record(*, corpus_ids: Iterable[int]) -> None:
    """A search of these corpora, written now (synchronous callers)."""
    day = today()
    corpus_days_add({(pk, day): {"searches": 1} for pk in set(corpus_ids)})


_add_async = database_sync_to_async(corpus_days_add, thread_sensitive=False)


class SearchCounter:
    """The chat path's searches, summed in memory and written in batches."""

    def __init__(self) -> None:
        self._pending: Counter[tuple[int, date]] = Counter()
        self._task: asyncio.Task | None = None

    def add(self, corpus_ids: Iterable[int]) -> None:
        day = today()
        for pk in set(corpus_ids):
            self._pending[(pk, day)] += 1
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while self._pending:
            await asyncio.sleep(settings.RAG_USAGE_FLUSH_SECONDS)
            await self.flush()

    async def flush(self) -> None:
        pending, self._pending = self._pending, Counter()
        if not pending:
            return
        try:
            await _add_async({key: {"searches": n} for key, n in pending.items()})
        except Exception:
            # Losing counts must never break serving; say so loudly instead.
            logger.exception("could not record %d corpus search counts", len(pending))


search_counter = SearchCounter()
