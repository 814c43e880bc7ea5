"""Reads for API keys, shared by /v1 (auth.py) and the tenant REST API (api_auth.py)."""

from __future__ import annotations

import hmac
from datetime import datetime

from apps.tenants.models import ApiKey, RotatedKey
from apps.tenants.services import hash_key, split_key


def key_find(*, raw_key: str) -> tuple[ApiKey, RotatedKey | None] | None:
    """The key a raw key belongs to, with its tenant: by its current secret, else by a
    previous (rotated) one, returned beside it. None if it matches neither."""
    prefix = split_key(raw_key)
    if prefix is None:
        return None
    key = ApiKey.objects.select_related("tenant").filter(prefix=prefix).first()
    if key is not None:
        return (key, None) if hmac.compare_digest(key.key_hash, hash_key(raw_key)) else None
    old = RotatedKey.objects.select_related("api_key__tenant").filter(prefix=prefix).first()
    if old is None or not hmac.compare_digest(old.key_hash, hash_key(raw_key)):
        return None
    return old.api_key, old


def rotated_key_message(*, rotated_at: datetime, grace_ends_at: datetime) -> str:
    return (
        f"This API key was rotated on {rotated_at:%Y-%m-%d %H:%M:%S} UTC and its grace "
        f"period ended at {grace_ends_at:%Y-%m-%d %H:%M:%S} UTC; use the new key."
    )
