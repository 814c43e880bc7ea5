"""How a refused reservation looks to a /v1 client: OpenAI's 429 `insufficient_quota`."""

from __future__ import annotations

from apps.core.errors import ApiError
from apps.quotas.state import QuotaExceeded


def quota_exceeded_error(exc: QuotaExceeded) -> ApiError:
    headers = []
    if exc.retry_after_seconds is not None:
        headers.append((b"retry-after", str(exc.retry_after_seconds).encode()))
    return ApiError(
        429, exc.message, type="insufficient_quota", code="insufficient_quota", headers=headers
    )
