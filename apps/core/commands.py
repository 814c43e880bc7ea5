"""What every setup command shares: a schema brought up to date first, one-line errors.

A new user's first command may well be `create_tenant` on a data directory nothing has
migrated yet; it must work there as `serve` does, not die with "relation does not exist".
"""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.core.management import call_command
from django.core.management.base import BaseCommand, OutputWrapper
from django.db import DEFAULT_DB_ALIAS, connections
from django.db.migrations.executor import MigrationExecutor


def database_migrate(*, out: OutputWrapper | None = None) -> int:
    """Apply the migrations not yet applied (quietly); how many there were. Says so on
    `out` when there are any, since a first run takes a few seconds."""
    executor = MigrationExecutor(connections[DEFAULT_DB_ALIAS])
    pending = executor.migration_plan(executor.loader.graph.leaf_nodes())
    if pending:
        if out is not None:
            out.write(f"Applying {len(pending)} database migrations first (a new database).")
        call_command("migrate", interactive=False, verbosity=0)
    return len(pending)


def error_text(error: ValidationError) -> str:
    """'field: message' in one line, without Django's dict/list repr."""
    if not hasattr(error, "error_dict"):
        return " ".join(error.messages)
    return " ".join(
        msg if field == "__all__" else f"{field}: {msg}"
        for field, msgs in error.message_dict.items()
        for msg in msgs
    )


class SetupCommand(BaseCommand):
    """Base of the gateway's management commands: migrates before `handle`, as `serve`
    does, so each works on a fresh data directory."""

    # Django's hook for "warn about unapplied migrations", run by execute() before handle().
    requires_migrations_checks = True

    def check_migrations(self) -> None:
        database_migrate(out=self.stderr)
