"""Direct libpq connections beside Django's own (batched writes, the engine manager)."""

from __future__ import annotations

from typing import Any

from django.db import connections

# Django-only OPTIONS keys that libpq would reject.
_DJANGO_OPTIONS = {"isolation_level", "server_side_binding", "pool", "assume_role", "sslcert"}


def connection_kwargs() -> dict[str, Any]:
    """libpq parameters of Django's default database (the test database under pytest)."""
    settings_dict = connections["default"].settings_dict
    kwargs: dict[str, Any] = {
        "dbname": settings_dict["NAME"],
        "user": settings_dict.get("USER") or None,
        "password": settings_dict.get("PASSWORD") or None,
        "host": settings_dict.get("HOST") or None,
        "port": str(settings_dict["PORT"]) if settings_dict.get("PORT") else None,
    }
    options = settings_dict.get("OPTIONS") or {}
    kwargs.update({k: v for k, v in options.items() if k not in _DJANGO_OPTIONS})
    return {k: v for k, v in kwargs.items() if v is not None}
