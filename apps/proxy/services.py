"""Start-up chores for a gateway process."""

from __future__ import annotations

import os
import secrets

from django.contrib.auth import get_user_model


def admin_user_ensure(*, username: str = "admin") -> str | None:
    """Create the first superuser if there is none; return its password if just created.

    The password is ADMIN_PASSWORD when set, else generated (and shown once by the caller).
    """
    user_model = get_user_model()
    if user_model.objects.filter(is_superuser=True).exists():
        return None
    password = os.environ.get("ADMIN_PASSWORD") or secrets.token_urlsafe(12)
    user_model.objects.create_superuser(username=username, email="", password=password)
    return password
