"""API key authentication for /v1, with a short in-process cache.

A hit costs a dict lookup; a miss costs one query (key + tenant + allowed models). Revoking
a key, letting it expire or deactivating its tenant takes effect within
AUTH_CACHE_SECONDS (expiry itself is checked on every request). A rotated key's previous
secret authenticates as the same key until its grace period ends, also checked on every
request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from channels.db import database_sync_to_async
from django.conf import settings

from apps.core.errors import ApiError
from apps.tenants.models import ApiKey
from apps.tenants.selectors import INCORRECT_KEY, key_find, key_refusal

_CACHE_MAX_ENTRIES = 10_000


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a tenant through one of its keys."""

    key_id: int
    key_name: str
    tenant_id: int
    tenant_slug: str
    tenant_active: bool
    expires_at: datetime | None
    revoked: bool
    allowed_model_ids: frozenset[int] | None  # None: every model; empty: none
    key_rpm: int | None = None
    tenant_weight: int = 1  # share of engine slots when tenants compete
    tenant_rpm: int | None = None
    # What other apps attach to a key (attach_to_principal): e.g. the token quotas that
    # apply. Loaded and cached with the key, so changes take effect within
    # AUTH_CACHE_SECONDS like everything else here.
    attachments: Mapping[str, Any] = field(default_factory=dict)
    # Set when the caller used a key's previous secret (RotatedKey): accepted until then.
    rotated_at: datetime | None = None
    grace_ends_at: datetime | None = None

    def may_use(self, model_id: int) -> bool:
        return self.allowed_model_ids is None or model_id in self.allowed_model_ids


PrincipalLoader = Callable[[ApiKey], Any]
_attachment_loaders: dict[str, PrincipalLoader] = {}


def attach_to_principal(name: str, loader: PrincipalLoader) -> None:
    """Have `loader(api_key)` run (on a worker thread) whenever a key is looked up, its
    result kept as `principal.attachments[name]`. Stages register theirs at app start, so
    this base app never imports them."""
    _attachment_loaders[name] = loader


_cache: dict[str, tuple[float, Principal | None]] = {}
_pending: dict[str, asyncio.Future] = {}


def _load_principal(raw_key: str) -> Principal | None:
    found = key_find(raw_key=raw_key)
    if found is None:
        return None
    key, old = found
    allowed = None  # not restricted: every model, and no query for the list
    if key.tenant.restrict_models:
        allowed = frozenset(key.tenant.allowed_models.values_list("pk", flat=True))
    return Principal(
        key_id=key.pk,
        key_name=key.name,
        tenant_id=key.tenant_id,
        tenant_slug=key.tenant.slug,
        tenant_active=key.tenant.active,
        expires_at=key.expires_at,
        revoked=key.revoked_at is not None,
        allowed_model_ids=allowed,
        key_rpm=key.requests_per_minute,
        tenant_rpm=key.tenant.requests_per_minute,
        attachments={name: load(key) for name, load in _attachment_loaders.items()},
        tenant_weight=key.tenant.scheduling_weight,
        rotated_at=old.rotated_at if old else None,
        grace_ends_at=old.grace_ends_at if old else None,
    )


_load_principal_async = database_sync_to_async(_load_principal, thread_sensitive=False)


async def _cached_principal(raw_key: str) -> Principal | None:
    now = time.monotonic()
    hit = _cache.get(raw_key)
    if hit is not None and now - hit[0] < settings.AUTH_CACHE_SECONDS:
        return hit[1]
    # One lookup per key at a time: concurrent requests with the same key share it.
    pending = _pending.get(raw_key)
    if pending is None:
        pending = asyncio.ensure_future(_load_principal_async(raw_key))
        _pending[raw_key] = pending
        pending.add_done_callback(lambda _: _pending.pop(raw_key, None))
    principal = await asyncio.shield(pending)
    if len(_cache) >= _CACHE_MAX_ENTRIES:
        _cache.clear()  # bounded: unknown keys from a scanner must not grow memory forever
    _cache[raw_key] = (now, principal)
    return principal


def bearer_token(authorization: bytes | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.decode("latin-1").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


async def identify(authorization: bytes | None) -> Principal:
    """Whose key this is, or an ApiError 401 (missing, unknown, revoked, expired key).

    The tenant may still be refused (require_active); callers that log refused requests
    need the Principal first, which is why this is a step of its own."""
    raw_key = bearer_token(authorization)
    if raw_key is None:
        raise ApiError(
            401,
            "Missing API key. Send it as `Authorization: Bearer sk-...`.",
            code="invalid_api_key",
        )
    principal = await _cached_principal(raw_key)
    if principal is None:
        raise ApiError(401, INCORRECT_KEY, code="invalid_api_key")
    # Checked on every request, so a cached key stops at its expiry or its grace end.
    refusal = key_refusal(
        revoked=principal.revoked,
        expires_at=principal.expires_at,
        rotated_at=principal.rotated_at,
        grace_ends_at=principal.grace_ends_at,
    )
    if refusal is not None:
        raise ApiError(401, refusal, code="invalid_api_key")
    return principal


def require_active(principal: Principal) -> None:
    """ApiError 403 if the key's tenant is inactive."""
    if not principal.tenant_active:
        raise ApiError(
            403,
            f"Tenant `{principal.tenant_slug}` is inactive.",
            type="permission_error",
            code="tenant_inactive",
        )


async def authenticate(authorization: bytes | None) -> Principal:
    """The caller's Principal, or an ApiError (401 bad key, 403 inactive tenant)."""
    principal = await identify(authorization)
    require_active(principal)
    return principal
