"""How a refused reservation looks to a /v1 client: OpenAI's 429 `insufficient_quota`."""

from __future__ import annotations

from apps.core.errors import ApiError
from apps.quotas.costs import money
from apps.quotas.periods import Period
from apps.quotas.state import QuotaExceeded, describe_reset


def quota_exceeded_error(exc: QuotaExceeded) -> ApiError:
    headers = []
    if exc.retry_after_seconds is not None:
        headers.append((b"retry-after", str(exc.retry_after_seconds).encode()))
    return ApiError(
        429, exc.message, type="insufficient_quota", code="insufficient_quota", headers=headers
    )


def budget_exceeded_error(exc: QuotaExceeded) -> ApiError:
    """The same 429 for a cost budget, its amounts in currency units."""
    state = exc.state
    per = "in total" if state.period == Period.TOTAL else f"per {state.period}"
    message = (
        f"Cost budget exceeded for {exc.subject} ({state.period}): {money(state.limit)} {per}, "
        f"{money(state.remaining)} left, this request may cost up to {money(exc.requested)}; "
        f"{describe_reset(state, now=exc.now)}."
    )
    error = quota_exceeded_error(exc)
    return ApiError(429, message, type=error.type, code=error.code, headers=error.headers)
