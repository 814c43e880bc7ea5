from __future__ import annotations

from argparse import ArgumentParser
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from apps.engines.services import served_model_set_fallbacks


class Command(BaseCommand):
    help = (
        "Set the models that serve MODEL's requests, in order, when its engines are down or "
        "overloaded: set_fallbacks MODEL FALLBACK [FALLBACK ...], or --none to clear them."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("model")
        parser.add_argument("fallbacks", nargs="*")
        parser.add_argument("--none", action="store_true", help="Remove every fallback.")

    def handle(self, *args: Any, model: str, fallbacks: list[str], none: bool, **options) -> None:
        if none and fallbacks:
            raise CommandError("Give fallbacks or --none, not both.")
        if not none and not fallbacks:
            raise CommandError("Give at least one FALLBACK model, or --none to clear them.")
        try:
            served = served_model_set_fallbacks(name=model, fallbacks=fallbacks)
        except ValidationError as exc:
            raise CommandError(" ".join(exc.messages)) from None
        if served.fallbacks:
            self.stdout.write(f"{model} falls back to: {', '.join(served.fallbacks)}")
        else:
            self.stdout.write(f"{model} has no fallbacks.")
