"""Pipeline stages of the tenants base: who is calling, and may it call now."""

from __future__ import annotations

from apps.core.context import RequestContext
from apps.tenants.auth import identify, require_active
from apps.tenants.rate_limits import rate_limit_check


async def authenticate(ctx: RequestContext) -> None:
    """The caller's key (401 otherwise). Set before admission, so refused requests (403,
    429) are request-logged under their tenant."""
    ctx.principal = await identify(ctx.header(b"authorization"))


async def admit(ctx: RequestContext) -> None:
    """Refuse an inactive tenant (403); count the request against its rate limits (429)."""
    assert ctx.principal is not None
    require_active(ctx.principal)
    await rate_limit_check(ctx.principal)
