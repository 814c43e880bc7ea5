"""Writes for tenants and API keys."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db import transaction
from django.utils import timezone

from apps.tenants.models import ApiKey, RotatedKey, Tenant

KEY_PREFIX_LENGTH = 12
_PREFIX_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


def hash_key(raw_key: str) -> str:
    """SHA-256 of the whole key. Keys carry 256 random bits, so a slow KDF adds nothing."""
    return hashlib.sha256(raw_key.encode()).hexdigest()


def split_key(raw_key: str) -> str | None:
    """The lookup prefix of `sk-<prefix>_<secret>`, or None if it is not shaped like a key."""
    if not raw_key.startswith("sk-"):
        return None
    prefix, sep, secret = raw_key[3:].partition("_")
    if not sep or len(prefix) != KEY_PREFIX_LENGTH or not secret:
        return None
    return prefix


@dataclass(frozen=True)
class CreatedKey:
    api_key: ApiKey
    raw_key: str  # shown once to whoever created it; never stored


def tenant_create(*, slug: str, name: str = "") -> Tenant:
    tenant = Tenant(slug=slug, name=name or slug)
    tenant.full_clean()
    tenant.save()
    return tenant


def api_key_create(*, tenant: Tenant, name: str, expires_at: datetime | None = None) -> CreatedKey:
    api_key = ApiKey(tenant=tenant, name=name, expires_at=expires_at)
    raw_key = api_key_fill_new(api_key=api_key)
    api_key.full_clean()
    api_key.save()
    return CreatedKey(api_key=api_key, raw_key=raw_key)


def api_key_fill_new(*, api_key: ApiKey) -> str:
    """Give an unsaved ApiKey (e.g. from the admin form) its secret; return the raw key."""
    prefix = "".join(secrets.choice(_PREFIX_ALPHABET) for _ in range(KEY_PREFIX_LENGTH))
    raw_key = f"sk-{prefix}_{secrets.token_urlsafe(32)}"
    api_key.prefix = prefix
    api_key.key_hash = hash_key(raw_key)
    return raw_key


@transaction.atomic
def api_key_revoke(*, api_key: ApiKey) -> None:
    if api_key.revoked_at is None:
        api_key.revoked_at = timezone.now()
        api_key.save(update_fields=["revoked_at"])


def api_keys_touch(*, key_ids: list[int], used_at: datetime) -> None:
    """Record last use for keys seen in a batch of requests (one UPDATE)."""
    if key_ids:
        ApiKey.objects.filter(pk__in=key_ids).update(last_used_at=used_at)


class RotationError(ValueError):
    """A key that cannot be rotated (revoked, expired, negative grace)."""


@transaction.atomic
def api_key_rotate(*, api_key: ApiKey, grace: timedelta) -> CreatedKey:
    """Give the key a new secret; the old one keeps working for `grace`, then is refused.

    The ApiKey row (its id, name, quotas, usage) stays: only its secret changes, and the old
    secret moves to a RotatedKey that authenticates as the same key until the grace ends."""
    if grace < timedelta(0):
        raise RotationError("The grace period cannot be negative.")
    api_key = ApiKey.objects.select_for_update().get(pk=api_key.pk)
    if api_key.is_revoked:
        raise RotationError(f"Key {api_key.name!r} is revoked; create a new key instead.")
    if api_key.is_expired():
        raise RotationError(f"Key {api_key.name!r} has expired; create a new key instead.")
    now = timezone.now()
    RotatedKey.objects.create(
        api_key=api_key,
        prefix=api_key.prefix,
        key_hash=api_key.key_hash,
        rotated_at=now,
        grace_ends_at=now + grace,
    )
    raw_key = api_key_fill_new(api_key=api_key)
    api_key.save(update_fields=["prefix", "key_hash"])
    return CreatedKey(api_key=api_key, raw_key=raw_key)
