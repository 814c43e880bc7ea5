"""Reads for tenants and API keys: the one check of a presented key, for /v1 and /api."""

from __future__ import annotations

import hmac
from datetime import datetime

from django.utils import timezone

from apps.tenants.models import ApiKey
from apps.tenants.services import hash_key, split_key

INCORRECT_KEY = "Incorrect API key provided."


def api_key_for(*, raw_key: str) -> ApiKey | None:
    """The key (with its tenant) whose secret `raw_key` is, compared in constant time;
    None for anything else. Revocation and expiry are the caller's (key_refusal)."""
    prefix = split_key(raw_key)
    if prefix is None:
        return None
    api_key = ApiKey.objects.select_related("tenant").filter(prefix=prefix).first()
    if api_key is None or not hmac.compare_digest(api_key.key_hash, hash_key(raw_key)):
        return None
    return api_key


def key_refusal(*, revoked: bool, expires_at: datetime | None) -> str | None:
    """Why a genuine key may not be used (revoked, expired), or None."""
    if revoked:
        return "This API key has been revoked."
    if expires_at is not None and expires_at <= timezone.now():
        return "This API key has expired."
    return None
