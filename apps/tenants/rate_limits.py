"""Requests-per-minute limits per API key and per tenant (django-ratelimit on the cache).

With REDIS_URL set the Django cache is Redis, so every gateway process shares the counters;
otherwise each process counts on its own (local memory). Redis calls block, so they run in
a worker thread; local-memory calls are cheap enough for the event loop.
"""

from __future__ import annotations

from asgiref.sync import sync_to_async
from django.conf import settings
from django_ratelimit.core import get_usage

from apps.core.errors import ApiError
from apps.tenants.auth import Principal


def _count(scope: str, ident: int, rpm: int) -> dict:
    usage = get_usage(
        None,  # no HttpRequest on the /v1 path; the key function below ignores it
        group=f"rpm:{scope}",
        key=lambda group, request: str(ident),
        rate=f"{rpm}/m",
        increment=True,
    )
    return usage or {"should_limit": False}


def _check(limits: list[tuple[str, str, int, int]]) -> None:
    # Every limit counts the request, refused or not (django-ratelimit's fixed window), so
    # the key's and the tenant's counters always agree on what was asked of them.
    counted = [(label, rpm, _count(scope, ident, rpm)) for scope, label, ident, rpm in limits]
    for label, rpm, usage in counted:
        if usage["should_limit"]:
            retry_after = max(1, int(usage.get("time_left", 60)))
            raise ApiError(
                429,
                f"Rate limit reached for {label}: {rpm} requests per minute. "
                f"Please try again in {retry_after}s.",
                type="requests",
                code="rate_limit_exceeded",
                headers=[(b"retry-after", str(retry_after).encode())],
            )


_check_in_thread = sync_to_async(_check, thread_sensitive=False)


async def rate_limit_check(principal: Principal) -> None:
    """Count this request against the key's and the tenant's limits; 429 if over either."""
    limits = []
    if principal.key_rpm:
        limits.append(("key", f"API key {principal.key_name}", principal.key_id, principal.key_rpm))
    if principal.tenant_rpm:
        limits.append(
            ("tenant", f"tenant {principal.tenant_slug}", principal.tenant_id, principal.tenant_rpm)
        )
    if not limits:
        return
    if settings.REDIS_URL:
        await _check_in_thread(limits)
    else:
        _check(limits)
