"""Admin pieces every app shares (apps.core is not an installed app: nothing registers here)."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest


class ReadOnlyAdminMixin:
    """For rows the gateway writes (logs, windows, messages): nobody adds or edits them in
    the admin. Deleting is refused too, unless `superusers_may_delete` (old logs)."""

    superusers_may_delete = False

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return self.superusers_may_delete and request.user.is_superuser
