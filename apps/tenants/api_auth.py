"""Tenant API-key authentication for DRF views, with the same rules as /v1.

No cache here (unlike /v1): these endpoints are not on the hot path, so a revoked key
stops working at once. Reusable by any tenant-facing REST API (e.g. quotas).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication, get_authorization_header
from rest_framework.parsers import JSONParser
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.views import APIView

from apps.core.api_errors import openai_exception_handler
from apps.tenants.models import ApiKey, Tenant
from apps.tenants.selectors import INCORRECT_KEY, key_find, key_refusal


@dataclass(frozen=True)
class TenantPrincipal:
    """`request.user` of a tenant API request: the tenant, through one of its keys."""

    tenant: Tenant
    api_key: ApiKey
    is_authenticated: ClassVar[bool] = True
    is_anonymous: ClassVar[bool] = False

    @property
    def pk(self) -> int:
        # DRF's user-keyed throttles read request.user.pk; limits belong to the tenant.
        return self.tenant.pk


def _bad_key(message: str) -> exceptions.AuthenticationFailed:
    return exceptions.AuthenticationFailed(message, code="invalid_api_key")


class TenantApiKeyAuthentication(BaseAuthentication):
    """`Authorization: Bearer sk-...`: 401 for a bad, revoked or expired key, 403 for an
    inactive tenant. No header at all is left to the permission check (401)."""

    def authenticate(self, request: Request) -> tuple[TenantPrincipal, ApiKey] | None:
        scheme, _, token = get_authorization_header(request).decode("latin-1").partition(" ")
        if not scheme:
            return None
        raw_key = token.strip()
        if scheme.lower() != "bearer" or not raw_key:
            raise _bad_key("Send the API key as `Authorization: Bearer sk-...`.")
        found = key_find(raw_key=raw_key)
        if found is None:
            raise _bad_key(INCORRECT_KEY)
        api_key, old = found
        refusal = key_refusal(
            revoked=api_key.revoked_at is not None,
            expires_at=api_key.expires_at,
            rotated_at=old.rotated_at if old else None,
            grace_ends_at=old.grace_ends_at if old else None,
        )
        if refusal is not None:
            raise _bad_key(refusal)
        if not api_key.tenant.active:
            raise exceptions.PermissionDenied(
                f"Tenant `{api_key.tenant.slug}` is inactive.", code="tenant_inactive"
            )
        return TenantPrincipal(tenant=api_key.tenant, api_key=api_key), api_key

    def authenticate_header(self, request: Request) -> str:
        # Non-empty, so DRF answers 401 (not 403) to missing or bad credentials.
        return 'Bearer realm="api"'


class TenantApiView(APIView):
    """Base for tenant-facing JSON APIs: API-key auth and OpenAI-shaped errors."""

    authentication_classes = [TenantApiKeyAuthentication]
    permission_classes = [IsAuthenticated]
    parser_classes = [JSONParser]

    def get_exception_handler(self) -> Any:
        return openai_exception_handler

    @property
    def principal(self) -> TenantPrincipal:
        return self.request.user
