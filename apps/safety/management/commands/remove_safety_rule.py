from __future__ import annotations

from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from apps.safety.services import rule_remove


class Command(BaseCommand):
    help = "Remove the safety rule NAME (its events stay, by name)."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("name")

    def handle(self, *args: Any, name: str, **options: Any) -> None:
        if not rule_remove(name=name):
            raise CommandError(f"No safety rule named {name!r}.")
        self.stdout.write(f"Removed safety rule {name}.")
