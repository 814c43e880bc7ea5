"""Setup commands on a data directory nothing has migrated yet (a new user's first run)."""

from __future__ import annotations

import re

from tests.conftest import manage

MIGRATING = re.compile(r"Applying \d+ database migrations first \(a new database\)\.")


def test_it_migrates_a_fresh_data_directory_before_creating_a_tenant(data_dir):
    created = manage(data_dir, "create_tenant", "acme", "--name", "Acme Inc.")

    assert created.returncode == 0, created.stderr
    assert created.stdout.strip() == "Created tenant acme"
    assert MIGRATING.fullmatch(created.stderr.strip())

    key = manage(data_dir, "create_api_key", "acme", "--name", "backend")
    assert key.returncode == 0, key.stderr
    assert key.stdout.splitlines()[-1].startswith("sk-")
    assert key.stderr == ""  # nothing left to migrate, nothing said


def test_it_migrates_a_fresh_data_directory_for_every_setup_command(data_dir):
    refused = manage(data_dir, "set_quota", "acme", "--tokens", "100", "--period", "day")

    # The command itself ran on a migrated database: its own one-line refusal, no traceback.
    assert refused.returncode == 1
    lines = refused.stderr.strip().splitlines()
    assert MIGRATING.fullmatch(lines[0])
    assert lines[1:] == ["CommandError: No tenant with slug 'acme'."]
