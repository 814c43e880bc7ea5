from __future__ import annotations

from argparse import ArgumentParser
from typing import Any
from urllib.parse import urlsplit

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from apps.engines.models import Engine
from apps.engines.services import engine_register_external


def checked_base_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CommandError(f"--base-url must be an http(s) URL with a host, got {url!r}.")
    if parts.path.rstrip("/").endswith("/v1"):
        raise CommandError(
            f"--base-url is the engine's root (e.g. http://127.0.0.1:8080), without /v1: {url!r}."
        )
    return url.rstrip("/")


def checked_models(models: list[str] | None) -> list[str]:
    names = list(dict.fromkeys(m.strip() for m in models or [] if m.strip()))
    if not names:
        raise CommandError("Give at least one --model.")
    return names


def checked_ctx_size(ctx_size: int | None) -> int | None:
    if ctx_size is not None and ctx_size <= 0:
        raise CommandError(f"--ctx-size must be a positive number of tokens, got {ctx_size}.")
    return ctx_size


def error_text(error: ValidationError) -> str:
    if not hasattr(error, "error_dict"):
        return " ".join(error.messages)
    return " ".join(f"{field}: {msg}" for field, msgs in error.message_dict.items() for msg in msgs)


class Command(BaseCommand):
    help = "Register an OpenAI-compatible engine and the models it serves (adds to existing)."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("name", help="Unique engine name (letters, digits, - and _).")
        # Where the engine runs. A managed engine (--command) may become an alternative;
        # then move --base-url into a required mutually exclusive group with it.
        parser.add_argument(
            "--base-url",
            required=True,
            help="Root URL of an external engine, e.g. http://127.0.0.1:8080 (no /v1).",
        )
        parser.add_argument(
            "--model",
            action="append",
            dest="models",
            metavar="MODEL",
            help="A model name the engine serves; repeat for several.",
        )
        parser.add_argument("--ctx-size", type=int, help="Context size in tokens.")
        parser.add_argument(
            "--flavor",
            choices=Engine.Flavor.values,
            help="Server software (default: llamacpp, or the engine's current flavor).",
        )

    def handle(self, *args: Any, name: str, **options: Any) -> None:
        engine = self.register_external(name, options)
        self.stdout.write(f"Engine {engine.name} ({engine.flavor}) at {engine.base_url} serves:")
        for variant in engine.variants.select_related("model"):
            ctx = f"ctx_size={variant.ctx_size}" if variant.ctx_size else "ctx_size unknown"
            self.stdout.write(f"  {variant.model.name} ({ctx})")

    def register_external(self, name: str, options: dict[str, Any]) -> Engine:
        base_url = checked_base_url(options["base_url"])
        models = checked_models(options["models"])
        ctx_size = checked_ctx_size(options["ctx_size"])
        flavor = options["flavor"]
        try:
            return engine_register_external(
                name=name, base_url=base_url, models=models, ctx_size=ctx_size, flavor=flavor
            )
        except ValidationError as e:
            raise CommandError(f"Cannot register engine {name!r}: {error_text(e)}") from e
