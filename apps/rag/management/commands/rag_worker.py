"""`manage.py rag_worker`: run document ingestion jobs (any number, on any host that
reaches the database)."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandParser

from apps.rag.worker import worker_main


class Command(BaseCommand):
    help = "Run RAG ingestion jobs (procrastinate worker on the `rag` queue)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--concurrency", type=int, default=None, help="Jobs at once (RAG_WORKER_CONCURRENCY)."
        )
        parser.add_argument("--once", action="store_true", help="Run the queued jobs, then exit.")

    def handle(self, *args, concurrency: int | None, once: bool, **options) -> None:
        worker_main(concurrency=concurrency, wait=not once)
