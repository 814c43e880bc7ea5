from __future__ import annotations

from argparse import ArgumentParser
from typing import Any

from django.core.management.base import CommandError

from apps.core.commands import SetupCommand
from apps.quotas.services import reservation_ttl_seconds, reservations_release_stale


class Command(SetupCommand):
    help = (
        "Release quota reservations older than QUOTA_RESERVATION_TTL_SECONDS (left by a "
        "crashed or hung process), giving their tokens back. Safe to run at any time."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument(
            "--older-than",
            type=float,
            help="Age in seconds (default: QUOTA_RESERVATION_TTL_SECONDS).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        ttl = options["older_than"]
        if ttl is None:
            ttl = reservation_ttl_seconds()
        if ttl < 0:
            raise CommandError("--older-than must be 0 or more seconds.")
        released = reservations_release_stale(ttl_seconds=ttl)
        self.stdout.write(f"Released {released} reservation(s) older than {ttl:g} s.")
