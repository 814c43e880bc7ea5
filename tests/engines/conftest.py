"""Fixtures of the engine manager tests (defined in manager_helpers)."""

from tests.engines.manager_helpers import engine_settings, manager  # noqa: F401
