"""Writes: reserve, settle and release tokens; set quotas and rate limits.

Exactness across processes comes from PostgreSQL row locks, not from any in-process state:
- quota_reserve and quota_settle are one round trip each: server-side functions
  (migration 0002) that create, lock (in the global order below), check and update every
  applicable window, so row locks are held only while PostgreSQL works, never across a
  client round trip. A refused request changes no window: it holds nothing anywhere.
- Every writer locks windows in one global order, (quota_id, window_start), so two requests
  sharing several windows (a tenant's hour and day quotas, say) never deadlock.
- A reservation is settled by DELETE ... RETURNING (in gateway_quota_settle), so it is
  applied at most once; the
  sweep releases a stale one by marking it (UPDATE ... RETURNING under SKIP LOCKED), so
  its tokens are given back once and a late settlement still charges the usage.

The functions are synchronous; the async /v1 pipeline calls them via database_sync_to_async.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter
from datetime import datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.db import DatabaseError, IntegrityError, connection, transaction
from django.db.models import Q
from django.utils import timezone

from apps.engines.models import ServedModel
from apps.quotas.costs import COST_SCALE, MAX_BUDGET, PRICE_PLACES, scaled
from apps.quotas.models import ModelPrice, Quota, QuotaWindow, Reservation, Unit, scope_label
from apps.quotas.periods import Period, window_end, window_start
from apps.quotas.state import QuotaExceeded, QuotaState, ReservationTicket
from apps.tenants.models import ApiKey, Tenant

__all__ = [
    "QuotaExceeded",
    "QuotaState",
    "ReservationTicket",
    "quota_release",
    "quota_reserve",
    "quota_set",
    "quota_settle",
    "rate_limit_set",
    "reservations_release_stale",
]

logger = logging.getLogger(__name__)

DEFAULT_RESERVATION_TTL_SECONDS = 900
# The opportunistic sweep in quota_reserve runs at most this often per process.
SWEEP_INTERVAL_SECONDS = 60.0
SWEEP_BATCH_SIZE = 500
# A released reservation is kept this long for a late settlement, then forgotten (its
# process is surely gone: no request runs for a day).
RELEASED_RETENTION = timedelta(days=1)

_WINDOW = QuotaWindow._meta.db_table
_QUOTA = Quota._meta.db_table
_RESERVATION = Reservation._meta.db_table


# Marks stale reservations released (their tokens are given back by the caller) but keeps
# the rows, so a request that outlives the TTL is still charged when it settles.
_RELEASE_STALE_SQL = f"""
UPDATE {_RESERVATION} SET released_at = %s WHERE id IN (
    SELECT id FROM {_RESERVATION} WHERE released_at IS NULL AND created_at < %s
    ORDER BY created_at LIMIT %s FOR UPDATE SKIP LOCKED
)
RETURNING tokens, window_ids
"""

_ADJUST_SQL = f"""
UPDATE {_WINDOW} AS w
SET reserved_tokens = w.reserved_tokens - d.release, used_tokens = w.used_tokens + d.charge
FROM unnest(%s::bigint[], %s::bigint[], %s::bigint[]) AS d(id, release, charge)
WHERE w.id = d.id
"""


# --- reserve ---------------------------------------------------------------------------


def quota_reserve(
    *,
    tenant_id: int,
    api_key_id: int,
    tokens: int,
    now: datetime | None = None,
    quotas: list[ApplicableQuota] | None = None,
) -> ReservationTicket:
    """Hold `tokens` in every quota that applies (the tenant's and this key's), or raise
    QuotaExceeded holding nothing. With no quota, one SELECT and no write.

    `quotas` (from quotas_applicable, e.g. cached with the caller's key) saves the lookup;
    limits are always checked against the live rows.
    """
    _require_non_negative(tokens, "tokens")
    now = now or timezone.now()
    _sweep_if_due()
    try:
        return _reserve(
            tenant_id=tenant_id, api_key_id=api_key_id, tokens=tokens, now=now, quotas=quotas
        )
    except IntegrityError:
        # A quota was deleted between our lookup and our insert (its window's FK failed):
        # look again, once; a second failure is a real error. Given quotas (token quotas
        # or cost budgets) lose only the deleted ones: a lookup would not know the unit.
        if quotas is not None:
            ids = [quota[0] for quota in quotas]
            alive = set(Quota.objects.filter(pk__in=ids).values_list("pk", flat=True))
            quotas = [quota for quota in quotas if quota[0] in alive]
        return _reserve(
            tenant_id=tenant_id, api_key_id=api_key_id, tokens=tokens, now=now, quotas=quotas
        )


ApplicableQuota = tuple[int, str, int, str | None, str]


def quotas_applicable(
    *, tenant_id: int, api_key_id: int, unit: str = Unit.TOKENS
) -> list[ApplicableQuota]:
    """(id, period, limit, key name or None, tenant slug) of each applicable quota (or,
    with unit=cost, budget), by id."""
    return list(
        Quota.objects.filter(tenant_id=tenant_id, unit=unit)
        .filter(Q(api_key__isnull=True) | Q(api_key_id=api_key_id))
        .order_by("pk")
        .values_list("pk", "period", "limit_tokens", "api_key__name", "tenant__slug")
    )


RESERVE_SQL = "SELECT * FROM gateway_quota_reserve(%s, %s, %s, %s, %s::bigint[], %s::timestamptz[])"
SETTLE_SQL = "SELECT * FROM gateway_quota_settle(%s, %s)"


def reserve_params(
    *, tenant_id: int, api_key_id: int, tokens: int, quotas: list[ApplicableQuota], now: datetime
) -> list:
    """Parameters of RESERVE_SQL (shared with the async /v1 path in pipeline.py)."""
    starts = [window_start(period, now) for _, period, *_ in quotas]
    quota_ids = [quota[0] for quota in quotas]
    return [uuid.uuid4(), tenant_id, api_key_id, tokens, quota_ids, starts]


def ticket_from_rows(
    rows: list[tuple], *, params: list, quotas: list[ApplicableQuota], now: datetime
) -> ReservationTicket:
    """The ticket for RESERVE_SQL's rows (window, quota, used, reserved, granted), or
    QuotaExceeded. The numbers were read under the windows' locks."""
    by_quota = {row[1]: row for row in rows}
    tokens = params[3]
    # A quota removed meanwhile has no window row any more: it no longer applies.
    states = [
        _state(quota_id, key_name, period, limit, *by_quota[quota_id][2:4], now)
        for quota_id, period, limit, key_name, _slug in quotas
        if quota_id in by_quota
    ]
    if not all(row[4] for row in rows):
        refused = [s for s in states if s.used + s.reserved + tokens > s.limit]
        raise _exceeded(refused, tokens=tokens, tenant_slug=quotas[0][4], now=now)
    return ReservationTicket(reservation_id=params[0], tokens=tokens, states=states)


def _reserve(
    *,
    tenant_id: int,
    api_key_id: int,
    tokens: int,
    now: datetime,
    quotas: list[ApplicableQuota] | None = None,
) -> ReservationTicket:
    if quotas is None:
        quotas = quotas_applicable(tenant_id=tenant_id, api_key_id=api_key_id)
    if not quotas:
        return ReservationTicket(reservation_id=None, tokens=tokens, states=[])
    params = reserve_params(
        tenant_id=tenant_id, api_key_id=api_key_id, tokens=tokens, quotas=quotas, now=now
    )
    with connection.cursor() as cursor:
        cursor.execute(RESERVE_SQL, params)
        rows = cursor.fetchall()
    return ticket_from_rows(rows, params=params, quotas=quotas, now=now)


def _state(
    quota_id: int,
    key_name: str | None,
    period: str,
    limit: int,
    used: int,
    reserved: int,
    now: datetime,
) -> QuotaState:
    return QuotaState(
        quota_id=quota_id,
        scope=scope_label(key_name),
        period=period,
        limit=limit,
        used=used,
        reserved=reserved,
        resets_at=window_end(period, window_start(period, now)),
    )


def _exceeded(
    refused: list[QuotaState], *, tokens: int, tenant_slug: str, now: datetime
) -> QuotaExceeded:
    """The error for the refused quota that frees up last: its reset time is the earliest
    moment the same request could succeed. The numbers were read under the windows' locks."""
    never = now + timedelta(days=366 * 1000)  # sorts "total" (never resets) last
    state = max(refused, key=lambda s: (s.resets_at or never, -s.remaining, -s.quota_id))
    return QuotaExceeded(state=state, requested=tokens, tenant_slug=tenant_slug, now=now)


# --- settle, release, sweep ------------------------------------------------------------


def quota_settle(
    *, ticket: ReservationTicket, actual_tokens: int, with_states: bool = True
) -> list[QuotaState]:
    """Replace the reservation by what the request really used, charged in full even above
    the reservation (the engine is the truth). A request that outlived the TTL, whose
    reservation the sweep already released, is still charged. Idempotent: settling an
    already settled or released ticket does nothing and returns []."""
    _require_non_negative(actual_tokens, "actual_tokens")
    if ticket.reservation_id is None:
        return []
    with connection.cursor() as cursor:
        cursor.execute(SETTLE_SQL, [ticket.reservation_id, actual_tokens])
        window_ids = [row[0] for row in cursor.fetchall()]
    return _window_states(window_ids) if window_ids and with_states else []


def quota_release(*, ticket: ReservationTicket) -> None:
    """Give the reservation back untouched (the request failed before the engine worked)."""
    quota_settle(ticket=ticket, actual_tokens=0)


# An admitted call's tokens straight into the current windows (created if need be), in
# the global lock order (quota id); no limit check: the call was admitted already.
_CHARGE_SQL = f"""
INSERT INTO {_WINDOW} AS w (quota_id, window_start, used_tokens, reserved_tokens)
SELECT t.q, t.s, %s, 0
FROM unnest(%s::bigint[], %s::timestamptz[]) WITH ORDINALITY AS t(q, s, n)
ORDER BY t.n
ON CONFLICT (quota_id, window_start) DO UPDATE SET used_tokens = w.used_tokens + EXCLUDED.used_tokens
"""


def quota_charge(
    *,
    tenant_id: int,
    api_key_id: int | None,
    tokens: int,
    now: datetime | None = None,
    quotas: list[ApplicableQuota] | None = None,
) -> None:
    """Charge `tokens` to every quota that applies, even past its limit: for engine work
    done on behalf of a request that was already admitted (a safety classifier call),
    which refusing now would not undo. One statement; nothing reserved."""
    _require_non_negative(tokens, "tokens")
    if tokens == 0:
        return
    now = now or timezone.now()
    for attempt in range(2):
        if quotas is None or attempt:
            quotas = quotas_applicable(tenant_id=tenant_id, api_key_id=api_key_id)
        if not quotas:
            return
        params = [
            tokens,
            [quota[0] for quota in quotas],
            [window_start(period, now) for _, period, *_ in quotas],
        ]
        try:
            with transaction.atomic(), connection.cursor() as cursor:
                cursor.execute(_CHARGE_SQL, params)
            return
        except IntegrityError:
            if attempt:  # a quota deleted meanwhile: looked up again once already
                raise


def reservations_release_stale(
    *, now: datetime | None = None, ttl_seconds: float | None = None
) -> int:
    """Give back the tokens of reservations older than the TTL (their process crashed or
    hung), so nothing stays reserved forever; forget released ones after a day. Returns
    how many were released now."""
    if ttl_seconds is None:
        ttl_seconds = reservation_ttl_seconds()
    now = now or timezone.now()
    cutoff = now - timedelta(seconds=ttl_seconds)
    released = 0
    while True:
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute(_RELEASE_STALE_SQL, [now, cutoff, SWEEP_BATCH_SIZE])
                claimed = cursor.fetchall()
            totals: Counter[int] = Counter()
            for tokens, window_ids in claimed:
                for window_id in window_ids:
                    totals[window_id] += tokens
            _windows_adjust({window_id: (total, 0) for window_id, total in totals.items()})
        released += len(claimed)
        if len(claimed) < SWEEP_BATCH_SIZE:
            break
    Reservation.objects.filter(released_at__lt=now - RELEASED_RETENTION).delete()
    return released


def reservation_ttl_seconds() -> float:
    return float(
        getattr(settings, "QUOTA_RESERVATION_TTL_SECONDS", DEFAULT_RESERVATION_TTL_SECONDS)
    )


def _windows_adjust(adjustments: dict[int, tuple[int, int]]) -> None:
    """reserved -= release, used += charge, per window id; windows gone with their quota
    are skipped. Locks in the global (quota_id, window_start) order first."""
    if not adjustments:
        return
    locked = list(
        QuotaWindow.objects.select_for_update()
        .filter(pk__in=adjustments)
        .order_by("quota_id", "window_start")
        .values_list("pk", flat=True)
    )
    if not locked:
        return
    with connection.cursor() as cursor:
        cursor.execute(
            _ADJUST_SQL,
            [
                locked,
                [adjustments[window_id][0] for window_id in locked],
                [adjustments[window_id][1] for window_id in locked],
            ],
        )


def _window_states(window_ids: list[int]) -> list[QuotaState]:
    windows = QuotaWindow.objects.filter(pk__in=window_ids).select_related("quota__api_key")
    return [
        QuotaState(
            quota_id=window.quota_id,
            scope=window.quota.scope,
            period=window.quota.period,
            limit=window.quota.limit_tokens,
            used=window.used_tokens,
            reserved=window.reserved_tokens,
            resets_at=window_end(window.quota.period, window.window_start),
        )
        for window in sorted(windows, key=lambda w: w.quota_id)
    ]


_sweep_lock = threading.Lock()
_last_sweep = float("-inf")


def sweep_due() -> bool:
    """Whether this process should run the stale-reservation sweep now (claims the turn)."""
    global _last_sweep
    with _sweep_lock:
        if time.monotonic() - _last_sweep < SWEEP_INTERVAL_SECONDS:
            return False
        _last_sweep = time.monotonic()
        return True


def _sweep_if_due() -> None:
    """Run the stale-reservation sweep from the request path at most once a minute per
    process, so a deployment without a scheduled `release_stale_reservations` still heals.
    A failing sweep is logged and never fails the request."""
    if sweep_due():
        sweep_now()


def sweep_now() -> None:
    try:
        released = reservations_release_stale()
    except DatabaseError:
        logger.exception("could not release stale quota reservations")
        return
    if released:
        logger.warning("released %d stale quota reservation(s)", released)


# --- configuration -----------------------------------------------------------------------


def quota_set(
    *,
    tenant: Tenant,
    tokens: int,
    period: str,
    api_key: ApiKey | None = None,
    unit: str = Unit.TOKENS,
) -> Quota | None:
    """Set the limit of the tenant's (or key's) quota for `period`; 0 removes it. Changing
    a limit keeps the usage already counted in the current window."""
    _require_non_negative(tokens, "tokens")
    if period not in Period.values:
        raise ValueError(f"Unknown period {period!r}; choose one of {', '.join(Period.values)}.")
    _require_key_of(tenant, api_key)
    if tokens == 0:
        with transaction.atomic():
            # Lock the quota first: a request creating its first window (whose foreign key
            # check holds a share lock on the quota) finishes before, or fails its FK
            # check after and looks again, instead of leaving a window on a deleted quota.
            scope = Quota.objects.filter(tenant=tenant, api_key=api_key, period=period, unit=unit)
            if list(scope.order_by("pk").select_for_update()):
                scope.delete()
        return None
    quota, _ = Quota.objects.update_or_create(
        tenant=tenant, api_key=api_key, period=period, unit=unit, defaults={"limit_tokens": tokens}
    )
    return quota


BUDGET_PERIODS = (Period.DAY, Period.MONTH, Period.TOTAL)


def budget_set(
    *, tenant: Tenant, amount: Decimal, period: str, api_key: ApiKey | None = None
) -> Quota | None:
    """A cost budget of `amount` currency units per period for the tenant (or one key);
    0 removes it. It is a Quota counting scaled cost units: reserved, leased, settled and
    swept exactly like a token quota."""
    if not isinstance(amount, Decimal) or not amount.is_finite():
        raise ValueError(f"The amount must be a decimal number, got {amount!r}.")
    if amount < 0 or amount > MAX_BUDGET:
        raise ValueError(f"The amount must be between 0 and {MAX_BUDGET:,}, got {amount}.")
    if period not in BUDGET_PERIODS:
        raise ValueError(f"Unknown budget period {period!r}; choose day, month or total.")
    if amount != amount.quantize(Decimal(1) / COST_SCALE):
        raise ValueError(f"The amount has more than 12 decimals: {amount}.")
    return quota_set(
        tenant=tenant, tokens=scaled(amount), period=period, api_key=api_key, unit=Unit.COST
    )


def price_set(
    *,
    model: ServedModel,
    input_price: Decimal,
    output_price: Decimal,
    cached_input_price: Decimal | None = None,
) -> ModelPrice:
    """Set a model's prices per million tokens (no cached price: the input price)."""
    for name, value in (
        ("input", input_price),
        ("output", output_price),
        ("cached input", cached_input_price),
    ):
        if value is None:
            continue
        if not isinstance(value, Decimal) or not value.is_finite() or value < 0:
            raise ValueError(f"The {name} price must be 0 or more, got {value}.")
        if value != value.quantize(PRICE_PLACES):
            raise ValueError(f"The {name} price has more than 6 decimals: {value}.")
    price, _ = ModelPrice.objects.update_or_create(
        model=model,
        defaults={
            "input_per_million": input_price,
            "output_per_million": output_price,
            "cached_input_per_million": cached_input_price,
        },
    )
    return price


def rate_limit_set(*, tenant: Tenant, rpm: int, api_key: ApiKey | None = None) -> None:
    """Requests per minute for the tenant (or one of its keys); 0 removes the limit."""
    _require_non_negative(rpm, "rpm")
    _require_key_of(tenant, api_key)
    target = api_key if api_key is not None else tenant
    target.requests_per_minute = rpm or None
    target.save(update_fields=["requests_per_minute"])


def _require_non_negative(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}.")
    if value < 0:
        raise ValueError(f"{name} must be 0 or more, got {value}.")


def _require_key_of(tenant: Tenant, api_key: ApiKey | None) -> None:
    if api_key is not None and api_key.tenant_id != tenant.pk:
        raise ValueError(f"API key {api_key.name!r} does not belong to tenant {tenant.slug}.")
