"""Reads for tenants and API keys: the one check of a presented key, for /v1 (auth.py)
and the tenant REST API (api_auth.py)."""

from __future__ import annotations

import hmac
from datetime import datetime

from django.utils import timezone

from apps.tenants.models import ApiKey, RotatedKey
from apps.tenants.services import hash_key, split_key

INCORRECT_KEY = "Incorrect API key provided."


def key_find(*, raw_key: str) -> tuple[ApiKey, RotatedKey | None] | None:
    """The key a raw key belongs to, with its tenant: by its current secret, else by a
    previous (rotated) one, returned beside it; compared in constant time. None if it
    matches neither. Revocation, expiry and grace are the caller's (key_refusal)."""
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


def key_refusal(
    *,
    revoked: bool,
    expires_at: datetime | None,
    rotated_at: datetime | None = None,
    grace_ends_at: datetime | None = None,
) -> str | None:
    """Why a genuine key may not be used (revoked, expired, an old secret past its grace
    period), or None."""
    now = timezone.now()
    if revoked:
        return "This API key has been revoked."
    if expires_at is not None and expires_at <= now:
        return "This API key has expired."
    if rotated_at is not None and grace_ends_at is not None and grace_ends_at <= now:
        return rotated_key_message(rotated_at=rotated_at, grace_ends_at=grace_ends_at)
    return None
