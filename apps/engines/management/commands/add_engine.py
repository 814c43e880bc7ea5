from __future__ import annotations

from argparse import ArgumentParser, ArgumentTypeError
from textwrap import shorten
from typing import Any
from urllib.parse import urlsplit

from django.core.exceptions import ValidationError
from django.core.management.base import CommandError

from apps.core.commands import SetupCommand, error_text
from apps.engines.discovery import slots_discover
from apps.engines.gguf_info import GgufError
from apps.engines.model_files import context_for_variant
from apps.engines.models import Engine
from apps.engines.services import engine_register_external, engine_register_managed

# Options that only make sense when the gateway runs the engine.
SCAN = "scan"
MANAGED_ONLY = ("model_path", "extra_args", "idle_ttl", "replicas", "startup_timeout")


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


def ctx_size_option(value: str) -> int | str:
    if value == SCAN:
        return value
    try:
        return int(value)
    except ValueError:
        raise ArgumentTypeError(f'must be a number of tokens or "scan", got {value!r}') from None


def scanned_ctx_size(model_path: str | None) -> int:
    if not model_path:
        raise CommandError("--ctx-size scan needs --model-path (the scanned .gguf file).")
    try:
        return context_for_variant(model_path=model_path)
    except GgufError as e:
        raise CommandError(str(e)) from e


def checked_ctx_size(ctx_size: int | None) -> int | None:
    if ctx_size is not None and ctx_size <= 0:
        raise CommandError(f"--ctx-size must be a positive number of tokens, got {ctx_size}.")
    return ctx_size


def checked_positive(option: str, value: int | None) -> int | None:
    if value is not None and value <= 0:
        raise CommandError(f"--{option} must be a positive number, got {value}.")
    return value


class Command(SetupCommand):
    help = (
        "Register an engine and the models it serves (adds to an existing engine): an "
        "external one (--base-url) or one the gateway runs itself (--command). For a "
        "managed engine, run it once per variant (model, context size, model file)."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("name", help="Unique engine name (letters, digits, - and _).")
        where = parser.add_mutually_exclusive_group(required=True)
        where.add_argument(
            "--base-url",
            action="append",
            dest="base_urls",
            metavar="URL",
            help="Root URL of an external engine, e.g. http://127.0.0.1:8080 (no /v1); "
            "repeat for more replicas serving the same models.",
        )
        where.add_argument(
            "--command",
            dest="command_template",
            metavar="TEMPLATE",
            help="Run the engine from the gateway with this command, e.g. "
            '"{llama_server} -m {model_path} --port {port} -c {ctx_total} -np {slots}". '
            "Placeholders: {port} (required), {model_path}, {ctx_size} (per request), "
            "{ctx_total} (ctx_size x slots, for llama-server's -c), {extra_args}, "
            "{slots}, {host}, {python}, {llama_server}.",
        )
        parser.add_argument(
            "--model",
            action="append",
            dest="models",
            metavar="MODEL",
            help="A model name the engine serves; repeat for several.",
        )
        parser.add_argument(
            "--ctx-size",
            type=ctx_size_option,
            help='Context size in tokens, or "scan": what scan_models found for --model-path '
            "(the largest context llama-server started with, else the largest fitting memory).",
        )
        parser.add_argument(
            "--flavor",
            choices=Engine.Flavor.values,
            help="Server software (default: llamacpp, or the engine's current flavor).",
        )
        parser.add_argument(
            "--slots",
            type=int,
            help="Requests one replica serves at once. Default for a new external engine: "
            "llama.cpp's total_slots from its /props (1 if it cannot be asked), 256 for "
            "vllm/openai, which batch; for a managed engine 1 (its -np {slots}); an "
            "existing engine keeps its value.",
        )
        parser.add_argument(
            "--system-prompt",
            metavar="TEXT",
            help="Default system prompt of the variant(s) this run creates or updates "
            '(overrides the tenant\'s; "" clears it; default: keep the current one).',
        )
        managed = parser.add_argument_group("managed engines (--command)")
        managed.add_argument(
            "--model-path", help="The variant's .gguf file, relative to MODELS_DIR."
        )
        managed.add_argument(
            "--extra-args",
            help="More arguments for this variant ({extra_args} in the command); write "
            "--extra-args=-fa when they start with a dash.",
        )
        managed.add_argument(
            "--idle-ttl",
            type=int,
            metavar="SECONDS",
            help="Stop a replica after this long without requests (default: never).",
        )
        managed.add_argument("--replicas", type=int, help="Processes to run (default 1).")
        managed.add_argument(
            "--startup-timeout",
            type=float,
            metavar="SECONDS",
            help="Longest wait for a new process to become healthy (default 120).",
        )

    def handle(self, *args: Any, name: str, **options: Any) -> None:
        if options["command_template"] is not None:
            engine = self.register_managed(name, options)
        else:
            engine = self.register_external(name, options)
        self.describe(engine)

    def register_external(self, name: str, options: dict[str, Any]) -> Engine:
        given = [f"--{o.replace('_', '-')}" for o in MANAGED_ONLY if options[o] is not None]
        if given:
            raise CommandError(f"{', '.join(given)} only apply to managed engines (--command).")
        if options["ctx_size"] == SCAN:
            raise CommandError("--ctx-size scan applies to managed engines (--model-path).")
        urls = [checked_base_url(url) for url in options["base_urls"]]
        models = checked_models(options["models"])
        slots = checked_positive("slots", options["slots"])
        existing = Engine.objects.filter(name=name).first()
        if slots is None and existing is None:
            slots = self.discovered_slots(options["flavor"] or Engine.Flavor.LLAMACPP, urls)
        try:
            return engine_register_external(
                name=name,
                base_url=urls[0],
                extra_base_urls=urls[1:],
                models=models,
                ctx_size=checked_ctx_size(options["ctx_size"]),
                flavor=options["flavor"],
                slots=slots,
                system_prompt=options["system_prompt"],
            )
        except ValidationError as e:
            raise CommandError(f"Cannot register engine {name!r}: {error_text(e)}") from e

    def discovered_slots(self, flavor: str, urls: list[str]) -> int:
        """A new engine without --slots: what it can serve at once, asked of it (shown)."""
        found = slots_discover(flavor=flavor, base_urls=urls)
        self.stdout.write(f"--slots {found.slots}: {found.source}")
        return found.slots

    def register_managed(self, name: str, options: dict[str, Any]) -> Engine:
        if options["ctx_size"] == SCAN:
            options["ctx_size"] = scanned_ctx_size(options["model_path"])
        try:
            return engine_register_managed(
                name=name,
                command_template=options["command_template"],
                models=checked_models(options["models"]),
                ctx_size=checked_ctx_size(options["ctx_size"]),
                model_path=options["model_path"] or "",
                extra_args=options["extra_args"] or "",
                flavor=options["flavor"],
                slots=checked_positive("slots", options["slots"]),
                replicas=checked_positive("replicas", options["replicas"]),
                idle_ttl_seconds=checked_positive("idle-ttl", options["idle_ttl"]),
                startup_timeout_seconds=options["startup_timeout"],
                system_prompt=options["system_prompt"],
            )
        except ValidationError as e:
            raise CommandError(f"Cannot register engine {name!r}: {error_text(e)}") from e

    def describe(self, engine: Engine) -> None:
        if engine.is_managed:
            ttl = f"{engine.idle_ttl_seconds} s" if engine.idle_ttl_seconds else "never"
            self.stdout.write(
                f"Engine {engine.name} ({engine.flavor}, managed) runs: "
                f"{engine.command_template}\n"
                f"  replicas={engine.replicas} slots={engine.slots} idle stop: {ttl}; serves:"
            )
        else:
            urls = ", ".join(engine.base_urls)
            self.stdout.write(
                f"Engine {engine.name} ({engine.flavor}) at {urls}, slots={engine.slots}, serves:"
            )
        for variant in engine.variants.select_related("model"):
            details = [f"ctx_size={variant.ctx_size}" if variant.ctx_size else "ctx_size unknown"]
            if variant.model_path:
                details.append(f"model_path={variant.model_path}")
            if variant.extra_args:
                details.append(f"extra_args={variant.extra_args}")
            if variant.system_prompt:
                details.append(f"system_prompt={shorten(variant.system_prompt, 60)!r}")
            self.stdout.write(f"  {variant.model.name} ({', '.join(details)})")
