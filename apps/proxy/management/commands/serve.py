"""`manage.py serve`: migrate (SetupCommand), make sure an admin exists, then serve with
uvicorn."""

from __future__ import annotations

import os

import uvicorn
from django.core.management.base import CommandParser

from apps.core.commands import SetupCommand
from apps.engines.scheduler_service import start_service_thread
from apps.proxy.services import admin_user_ensure


class Command(SetupCommand):
    help = "Migrate and serve the gateway (ASGI, uvicorn with uvloop + httptools)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
        parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
        parser.add_argument(
            "--workers",
            type=int,
            default=int(os.environ.get("WEB_CONCURRENCY", os.cpu_count() or 1)),
            help="Worker processes (default: one per core).",
        )
        parser.add_argument("--access-log", action="store_true", help="Log every request line.")

    def handle(
        self, *args, host: str, port: int, workers: int, access_log: bool, **options
    ) -> None:
        password = admin_user_ensure()
        shown_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        if password is not None and os.environ.get("ADMIN_PASSWORD"):
            # The operator chose it: never echo it into logs.
            self.stdout.write("Created superuser `admin` with the password from ADMIN_PASSWORD")
        elif password is not None:
            self.stdout.write(f"Created superuser `admin` with password: {password}")
        self.stdout.write(f"Admin: http://{shown_host}:{port}/admin/")
        self.stdout.write(f"OpenAI base_url: http://{shown_host}:{port}/v1")
        self.stdout.flush()
        if workers > 1:
            # One scheduler for all workers, so engine slots and fairness hold host-wide.
            os.environ["SCHEDULER_SOCKET"] = start_service_thread()
        uvicorn.run(
            "config.asgi:application",
            host=host,
            port=port,
            workers=max(1, workers),
            loop="uvloop",
            http="httptools",
            lifespan="on",
            access_log=access_log,
            log_level="warning",
            timeout_graceful_shutdown=10,
            # X-Forwarded-* rewriting costs a pass over the headers of every request and
            # nothing here uses the client address; enable it behind a trusted proxy.
            proxy_headers=bool(os.environ.get("FORWARDED_ALLOW_IPS")),
        )
