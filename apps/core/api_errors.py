"""OpenAI-shaped errors for the tenant REST API: {"error": {"message", "type", "param", "code"}}.

Set per view (TenantApiView does) rather than in settings.REST_FRAMEWORK, so DRF views
elsewhere keep DRF's own error format.
"""

from __future__ import annotations

import logging
from typing import Any

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.http import Http404
from rest_framework import exceptions
from rest_framework.response import Response
from rest_framework.views import set_rollback

from apps.core.errors import ApiError

logger = logging.getLogger(__name__)

MISSING_KEY_MESSAGE = "Missing API key. Send it as `Authorization: Bearer sk-...`."

# DRF exception -> (OpenAI error type, code); others fall back on DRF's default code.
_TYPES: dict[type[exceptions.APIException], tuple[str, str | None]] = {
    exceptions.NotAuthenticated: ("invalid_request_error", "invalid_api_key"),
    exceptions.AuthenticationFailed: ("invalid_request_error", "invalid_api_key"),
    exceptions.PermissionDenied: ("permission_error", None),
    exceptions.Throttled: ("requests", "rate_limit_exceeded"),
}


def openai_exception_handler(exc: Exception, context: dict[str, Any]) -> Response:
    """DRF's EXCEPTION_HANDLER contract; unexpected errors become a logged OpenAI 500."""
    if isinstance(exc, Http404):
        exc = exceptions.NotFound(*exc.args)
    elif isinstance(exc, DjangoPermissionDenied):
        exc = exceptions.PermissionDenied(*exc.args)
    if isinstance(exc, ApiError):
        error, headers = exc, {k.decode(): v.decode() for k, v in exc.headers}
    elif isinstance(exc, exceptions.APIException):
        error, headers = _from_drf(exc), _drf_headers(exc)
    else:
        logger.error("unhandled error in %s", context.get("view"), exc_info=exc)
        error = ApiError(500, "The gateway failed to handle this request.", type="api_error")
        headers = {}
    set_rollback()
    return Response(error.payload(), status=error.status, headers=headers)


def _from_drf(exc: exceptions.APIException) -> ApiError:
    message, param, code = _first_detail(exc.detail)
    if isinstance(exc, exceptions.NotAuthenticated):
        message = MISSING_KEY_MESSAGE
    default_type = "api_error" if exc.status_code >= 500 else "invalid_request_error"
    error_type, mapped_code = _TYPES.get(type(exc), (default_type, None))
    return ApiError(
        exc.status_code, message, type=error_type, code=mapped_code or code, param=param
    )


def _first_detail(detail: Any, param: str | None = None) -> tuple[str, str | None, str | None]:
    """(message, param, code) of the first error in DRF's nested detail.

    Nested field errors name their param with dots (`messages.0.role`); errors that are
    not about a field (`non_field_errors`) have no param.
    """
    if isinstance(detail, dict) and detail:
        key, value = next(iter(detail.items()))
        key = None if key == "non_field_errors" else str(key)
        return _first_detail(value, ".".join(p for p in (param, key) if p) or None)
    if isinstance(detail, list) and detail:
        return _first_detail(detail[0], param)
    code = getattr(detail, "code", None)
    message = f"{param}: {detail}" if param else str(detail)
    return message, param, code


def _drf_headers(exc: exceptions.APIException) -> dict[str, str]:
    headers = {}
    if getattr(exc, "auth_header", None):
        headers["WWW-Authenticate"] = exc.auth_header
    if getattr(exc, "wait", None):
        headers["Retry-After"] = f"{exc.wait:.0f}"
    return headers
